// An independent DICOM UPS worklist manager for the gateway's tests (IHE AI Workflow for Imaging, UPS Push / Pull),
// built on dcmjs-dimse - not on the gateway's own code. It keeps every workitem in memory, follows the UPS state
// machine of PS3.4 CC (SCHEDULED -> IN PROGRESS -> COMPLETED, Transaction UID checks, final-state requirements),
// and writes all workitems as JSON to --state after every change so the tests can read what it holds.
//
//   node manager.js --port 11114 --aet WORKLIST --state /tmp/ups.json
'use strict';

const fs = require('fs');
const net = require('net');
const dcmjsDimse = require('dcmjs-dimse');

const { Dataset, Scp } = dcmjsDimse;
const { NCreateResponse, NSetResponse, NActionResponse, NGetResponse } = dcmjsDimse.responses;
const { PresentationContextResult, TransferSyntax } = dcmjsDimse.constants;

const UPS = new Set([
  '1.2.840.10008.5.1.4.34.6.1', // Push
  '1.2.840.10008.5.1.4.34.6.2', // Watch
  '1.2.840.10008.5.1.4.34.6.3', // Pull
  '1.2.840.10008.5.1.4.34.6.4', // Event
]);
const VERIFICATION = '1.2.840.10008.1.1';

function argument(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 ? process.argv[at + 1] : fallback;
}

const port = Number(argument('port', '11114'));
const aet = argument('aet', 'WORKLIST');
const statePath = argument('state', 'ups.json');
const workitems = new Map(); // SOP Instance UID -> { elements, transactionUid, history }

function save() {
  const all = {};
  for (const [uid, item] of workitems) {
    all[uid] = { ...item.elements, _history: item.history };
  }
  fs.writeFileSync(`${statePath}.tmp`, JSON.stringify(all, null, 1));
  fs.renameSync(`${statePath}.tmp`, statePath);
}

function elementsOf(request) {
  const dataset = request.getDataset();
  return dataset ? { ...dataset.getElements() } : {};
}

class UpsManager extends Scp {
  associationRequested(association) {
    if (association.getCalledAeTitle() !== aet) {
      this.sendAssociationReject(1, 1, 7); // called AE title not recognised
      return;
    }
    for (const c of association.getPresentationContexts()) {
      const context = association.getPresentationContext(c.id);
      const syntaxes = context.getTransferSyntaxUids();
      const ok = UPS.has(context.getAbstractSyntaxUid()) || context.getAbstractSyntaxUid() === VERIFICATION;
      const syntax = [TransferSyntax.ExplicitVRLittleEndian, TransferSyntax.ImplicitVRLittleEndian].find((s) =>
        syntaxes.includes(s)
      );
      if (!ok) {
        context.setResult(PresentationContextResult.RejectAbstractSyntaxNotSupported);
      } else if (!syntax) {
        context.setResult(PresentationContextResult.RejectTransferSyntaxesNotSupported);
      } else {
        context.setResult(PresentationContextResult.Accept, syntax);
      }
    }
    this.sendAssociationAccept();
  }

  associationReleaseRequested() {
    this.sendAssociationReleaseResponse();
  }

  cEchoRequest(request, callback) {
    const { CEchoResponse } = dcmjsDimse.responses;
    const response = CEchoResponse.fromRequest(request);
    response.setStatus(0);
    callback(response);
  }

  nCreateRequest(request, callback) {
    const uid = request.getAffectedSopInstanceUid();
    const response = NCreateResponse.fromRequest(request);
    const elements = elementsOf(request);
    if (workitems.has(uid)) {
      response.setStatus(0x0111); // duplicate SOP Instance
    } else if (elements.ProcedureStepState !== 'SCHEDULED') {
      response.setStatus(0xc309); // the Procedure Step State must be SCHEDULED at creation
    } else if (!elements.ScheduledProcedureStepPriority || !elements.InputInformationSequence) {
      response.setStatus(0x0120); // missing attribute
    } else {
      workitems.set(uid, { elements, transactionUid: '', history: ['SCHEDULED'] });
      save();
      response.setStatus(0);
    }
    callback(response);
  }

  nSetRequest(request, callback) {
    const uid = request.getRequestedSopInstanceUid();
    const item = workitems.get(uid);
    const response = NSetResponse.fromRequest(request);
    const changes = elementsOf(request);
    if (!item) {
      response.setStatus(0xc307); // no such UPS
    } else if (item.elements.ProcedureStepState !== 'IN PROGRESS') {
      response.setStatus(0xc310); // not in progress: may not be updated
    } else if (changes.TransactionUID !== item.transactionUid) {
      response.setStatus(0xc301); // the correct Transaction UID was not provided
    } else {
      delete changes.TransactionUID;
      Object.assign(item.elements, changes);
      item.history.push('N-SET');
      save();
      response.setStatus(0);
    }
    callback(response);
  }

  nActionRequest(request, callback) {
    const uid = request.getRequestedSopInstanceUid();
    const item = workitems.get(uid);
    const response = NActionResponse.fromRequest(request);
    const wanted = elementsOf(request);
    const state = item ? item.elements.ProcedureStepState : '';
    if (request.getActionTypeId() !== 1) {
      response.setStatus(0x0123); // only Change UPS State here
    } else if (!item) {
      response.setStatus(0xc307);
    } else if (wanted.ProcedureStepState === 'IN PROGRESS') {
      if (state === 'IN PROGRESS') {
        response.setStatus(0xc302); // already in progress
      } else if (state !== 'SCHEDULED') {
        response.setStatus(0xc300); // may no longer be updated
      } else {
        item.elements.ProcedureStepState = 'IN PROGRESS';
        item.transactionUid = wanted.TransactionUID || '';
        item.history.push('IN PROGRESS');
        save();
        response.setStatus(0);
      }
    } else if (wanted.ProcedureStepState === 'COMPLETED') {
      const performed = (item.elements.UnifiedProcedureStepPerformedProcedureSequence || [])[0] || {};
      if (state === 'COMPLETED') {
        response.setStatus(0xb306); // warning: already completed
      } else if (state !== 'IN PROGRESS') {
        response.setStatus(0xc310);
      } else if (wanted.TransactionUID !== item.transactionUid) {
        response.setStatus(0xc301);
      } else if (!performed.PerformedProcedureStepEndDateTime || !performed.OutputInformationSequence) {
        response.setStatus(0xc304); // final state requirements not met
      } else {
        item.elements.ProcedureStepState = 'COMPLETED';
        item.history.push('COMPLETED');
        save();
        response.setStatus(0);
      }
    } else {
      response.setStatus(0xc303); // not a state change this manager allows
    }
    callback(response);
  }

  nGetRequest(request, callback) {
    const item = workitems.get(request.getRequestedSopInstanceUid());
    const response = NGetResponse.fromRequest(request);
    if (!item) {
      response.setStatus(0xc307);
    } else {
      response.setDataset(new Dataset({ ...item.elements }));
      response.setStatus(0);
    }
    callback(response);
  }
}

save();
// Our own listener, bound to loopback only (dcmjs-dimse's Server would listen on every interface).
const server = net.createServer((socket) => {
  const scp = new UpsManager(socket, { associationTimeout: 30000, pduTimeout: 30000 });
  scp.on('networkError', (e) => console.error('network error:', e.message));
});
server.listen(port, '127.0.0.1', () => console.log(`UPS worklist manager ${aet} on 127.0.0.1:${port}`));
process.on('SIGTERM', () => {
  server.close();
  process.exit(0);
});
