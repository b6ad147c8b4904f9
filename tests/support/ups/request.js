// The worklist manager's side of IHE AIW-I "push" to a performer, as an independent SCU (dcmjs-dimse): N-CREATE
// a UPS workitem on the gateway asking it to analyse a study that it retrieves from --source, then N-GET the
// workitem every half second until it is COMPLETED or CANCELED, and print its last state as JSON.
//
//   node request.js --port 11112 --aet AI_GATEWAY --calling WORKLIST --study 1.2.3 --source ORTHANC \
//        --workitem 1.2.3.4 [--priority HIGH] [--timeout 120]
'use strict';

const dcmjsDimse = require('dcmjs-dimse');

const { Client, Dataset } = dcmjsDimse;
const { NCreateRequest, NGetRequest } = dcmjsDimse.requests;
const UPS_PUSH = '1.2.840.10008.5.1.4.34.6.1';

function argument(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 ? process.argv[at + 1] : fallback;
}

const host = '127.0.0.1';
const port = Number(argument('port', '11112'));
const aet = argument('aet', 'AI_GATEWAY');
const calling = argument('calling', 'WORKLIST');
const workitem = argument('workitem');
const timeoutS = Number(argument('timeout', '120'));

function exchange(request) {
  return new Promise((resolve, reject) => {
    const client = new Client();
    let answer;
    request.on('response', (response) => {
      const dataset = response.getDataset();
      answer = { status: response.getStatus(), elements: dataset ? dataset.getElements() : {} };
    });
    client.addRequest(request);
    client.on('networkError', (e) => reject(e));
    client.on('associationRejected', () => reject(new Error('association rejected')));
    client.on('closed', () => (answer ? resolve(answer) : reject(new Error('no answer'))));
    client.send(host, port, calling, aet);
  });
}

async function main() {
  const create = new NCreateRequest(UPS_PUSH, workitem);
  create.setDataset(
    new Dataset({
      ProcedureStepState: 'SCHEDULED',
      ScheduledProcedureStepPriority: argument('priority', 'MEDIUM'),
      ProcedureStepLabel: 'AI analysis requested',
      WorklistLabel: 'AI',
      InputReadinessState: 'READY',
      ScheduledProcedureStepStartDateTime: '20261202120000',
      ScheduledWorkitemCodeSequence: [{ CodeValue: 'AI_ANALYSIS', CodingSchemeDesignator: '99TEST', CodeMeaning: 'AI analysis' }],
      InputInformationSequence: [
        {
          TypeOfInstances: 'DICOM',
          StudyInstanceUID: argument('study'),
          DICOMRetrievalSequence: [{ RetrieveAETitle: argument('source') }],
        },
      ],
    })
  );
  const created = await exchange(create);
  if (created.status !== 0) {
    console.log(JSON.stringify({ created: created.status }));
    process.exit(2);
  }
  const deadline = Date.now() + timeoutS * 1000;
  let last = {};
  while (Date.now() < deadline) {
    const got = await exchange(new NGetRequest(UPS_PUSH, workitem, []));
    last = { status: got.status, ...got.elements };
    if (['COMPLETED', 'CANCELED'].includes(last.ProcedureStepState)) {
      break;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
  console.log(JSON.stringify({ created: created.status, last }));
}

main().catch((e) => {
  console.error(e.message);
  process.exit(1);
});
