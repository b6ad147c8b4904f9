// The gateway's native C-STORE receiver (DCMTK): DICOM networking at C++ speed, with the gateway's rule kept -
// an instance is acknowledged only once it is in the spool, its file and its folder fsynced.
//
// Started and supervised by the gateway (gateway/ingest/native.py), never by hand. Policy comes from the
// command line, which the gateway builds from its one set of settings: AE title, port, calling AE titles and
// source addresses allowed, the disk watermark, timeouts, DICOM TLS (optionally mutual). Each association runs on
// a thread of its own.
//
// Per C-STORE: the data set is received exactly as sent (bit-preserving) into --incoming, its header read
// up to the pixel data and checked like the Python spool does (valid UIDs that can name files, SOP class and
// instance as in the request), the file fsynced, renamed to <spool>/<study>/<series>/<sop>.dcm, new folders and
// the series folder fsynced - and only then the response sent. Refusals use the same statuses as the Python
// receiver: 0xA700 below the watermark, 0xA900 SOP class differs from the request, 0xC000 cannot understand.
//
// It tells the gateway what happened as one line per event on stdout (tab-separated, flushed at once):
//   READY <port>
//   STORED <path> <calling AE> <received at, Unix s> [<SOP class> <study> <series> <modality> <body part>
//          <study description> <series description> <requested priority> <accession number> <pixel data 1|0>]
//          (the record's fields when they are plain ASCII single values; else the gateway reads the header)
//   REFUSED <status hex> <calling AE> <reason>
//   END <calling AE> <problem: "" | association aborted | instances refused> <study UIDs, comma-separated>
// It exits when its stdin closes (the gateway is gone) and on SIGTERM; it also asks the kernel for SIGTERM when its
// parent dies.

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dcdeftag.h"
#include "dcmtk/dcmdata/dcfilefo.h"
#include "dcmtk/dcmdata/dcuid.h"
#include "dcmtk/dcmnet/diutil.h"
#include "dcmtk/dcmnet/dulstruc.h"
#include "dcmtk/dcmnet/scpthrd.h"
#include "dcmtk/dcmtls/tlslayer.h"
#include "dcmtk/oflog/oflog.h"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <mutex>
#include <set>
#include <signal.h>
#include <string>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace {

const Uint16 STATUS_OUT_OF_RESOURCES = 0xA700;
const Uint16 STATUS_DATASET_MISMATCH = 0xA900;
const Uint16 STATUS_CANNOT_UNDERSTAND = 0xC000;
const Uint16 STATUS_PROCESSING_FAILURE = 0x0110;

struct Policy {
    std::string spool;
    std::string incoming;  // this node's folder for instances being received (inside the spool: same file system)
    std::set<std::string> calling_aes;  // empty: any
    std::set<std::string> addresses;    // empty: any
    unsigned long long min_free_bytes = 0;
};

Policy policy;
std::mutex out_lock;
std::atomic<unsigned long> sequence{0};

void emit(const std::string& line) {
    std::lock_guard<std::mutex> guard(out_lock);
    std::fwrite(line.data(), 1, line.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
}

std::string trimmed(const std::string& text) {
    size_t first = text.find_first_not_of(' ');
    if (first == std::string::npos) return "";
    return text.substr(first, text.find_last_not_of(' ') - first + 1);
}

std::string clean(const std::string& text) {  // no tab or newline can break a line of the protocol
    std::string out;
    for (char c : text) out += (c == '\t' || c == '\n' || c == '\r') ? ' ' : c;
    return out;
}

// A UID that can name a file: what pydicom's is_valid_uid accepts (components of digits, no leading zero).
bool valid_uid(const std::string& uid) {
    if (uid.empty() || uid.size() > 64) return false;
    size_t start = 0;
    while (start <= uid.size()) {
        size_t end = uid.find('.', start);
        if (end == std::string::npos) end = uid.size();
        if (end == start) return false;
        for (size_t i = start; i < end; ++i)
            if (uid[i] < '0' || uid[i] > '9') return false;
        if (end - start > 1 && uid[start] == '0') return false;
        start = end + 1;
        if (end == uid.size()) break;
    }
    return true;
}

bool fsync_path(const std::string& path, bool directory) {
    int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) return false;
    bool ok = ::fsync(fd) == 0;
    ::close(fd);
    return ok;
}

// A folder made (and its parent fsynced) when it does not exist yet.
bool ensure_folder(const std::string& folder, const std::string& parent) {
    struct stat st;
    if (::stat(folder.c_str(), &st) == 0) return S_ISDIR(st.st_mode);
    if (::mkdir(folder.c_str(), 0700) != 0 && errno != EEXIST) return false;
    return fsync_path(parent, true);
}

bool disk_low() {
    if (policy.min_free_bytes == 0) return false;
    struct statvfs fs;
    if (::statvfs(policy.spool.c_str(), &fs) != 0) return true;
    return static_cast<unsigned long long>(fs.f_bavail) * fs.f_frsize < policy.min_free_bytes;
}

double now() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string text_of(DcmItem* item, const DcmTagKey& tag) {
    OFString value;
    if (item == NULL || item->findAndGetOFString(tag, value).bad()) return "";
    return trimmed(value.c_str());
}

struct Checked {
    Uint16 status = 0;
    std::string reason, study, series;
    std::string header;  // the record's fields for the gateway, tab-separated; empty: it reads them itself
};

// A text value as the gateway's record takes it, or false when only the gateway can decode it faithfully (not
// plain printable ASCII, or more than one value).
bool plain_value(DcmItem* item, const DcmTagKey& tag, std::string& out) {
    out.clear();
    DcmElement* element = NULL;
    if (item->findAndGetElement(tag, element).bad() || element == NULL) return true;  // absent: ""
    if (element->getVM() > 1) return false;
    OFString value;
    if (element->getOFString(value, 0).bad() && element->getLength() > 0) return false;
    for (char c : std::string(value.c_str())) {
        if (c < 0x20 || c > 0x7e) return false;
    }
    out = trimmed(value.c_str());
    return true;
}

// Everything the gateway's instance record needs, so that it need not parse the file again.
std::string record_fields(DcmDataset* ds, const std::string& sop_class, const std::string& study,
                          const std::string& series) {
    const DcmTagKey tags[] = {DCM_Modality, DCM_BodyPartExamined, DCM_StudyDescription, DCM_SeriesDescription,
                              DCM_RequestedProcedurePriority, DCM_AccessionNumber};
    std::string line = sop_class + "\t" + study + "\t" + series;
    for (const DcmTagKey& tag : tags) {
        std::string value;
        if (!plain_value(ds, tag, value)) return "";
        line += "\t" + value;
    }
    bool pixels = ds->tagExists(DCM_PixelData) || ds->tagExists(DCM_FloatPixelData) ||
                  ds->tagExists(DCM_DoubleFloatPixelData);
    return line + (pixels ? "\t1" : "\t0");
}

// The stored file's header, checked as the Python spool checks it.
Checked check(const std::string& path, const T_DIMSE_C_StoreRQ& request) {
    Checked out;
    DcmFileFormat file;
    // Values longer than 4 KiB (the pixel data) are skipped, not read: the header costs what storescp's does.
    OFCondition read = file.loadFile(path.c_str(), EXS_Unknown, EGL_noChange, 4096, ERM_autoDetect);
    if (read.bad()) {
        out.status = STATUS_CANNOT_UNDERSTAND;
        out.reason = std::string("dataset cannot be parsed: ") + read.text();
        return out;
    }
    DcmDataset* ds = file.getDataset();
    std::string sop_class = text_of(ds, DCM_SOPClassUID), sop = text_of(ds, DCM_SOPInstanceUID);
    out.study = text_of(ds, DCM_StudyInstanceUID);
    out.series = text_of(ds, DCM_SeriesInstanceUID);
    if (!valid_uid(out.study) || !valid_uid(out.series) || !valid_uid(sop)) {
        out.status = STATUS_CANNOT_UNDERSTAND;
        out.reason = "UID is not valid and cannot name a spool file";
    } else if (sop_class != trimmed(request.AffectedSOPClassUID)) {
        out.status = STATUS_DATASET_MISMATCH;
        out.reason = "SOP Class UID in the dataset differs from the C-STORE request";
    } else if (sop != trimmed(request.AffectedSOPInstanceUID)) {
        out.status = STATUS_CANNOT_UNDERSTAND;
        out.reason = "SOP Instance UID in the dataset differs from the C-STORE request";
    } else {
        out.header = record_fields(ds, sop_class, out.study, out.series);
    }
    return out;
}


class GatewaySCP : public DcmThreadSCP {
  public:
    GatewaySCP() {}

  protected:
    OFBool checkCallingAETitleAccepted(const OFString& calling) override {
        std::string ae = trimmed(calling.c_str());
        bool ok = policy.calling_aes.empty() || policy.calling_aes.count(ae) > 0;
        if (!ok) emit("REJECTED\t" + clean(ae) + "\tcalling AE title not allowed");
        return ok;
    }

    OFBool checkCallingHostAccepted(const OFString& host) override {
        bool ok = policy.addresses.empty() || policy.addresses.count(host.c_str()) > 0;
        if (!ok) emit("REJECTED\t\tsource address not allowed");
        return ok;
    }

    void notifyAssociationAcknowledge() override {
        calling_ae_ = trimmed(getPeerAETitle().c_str());
        studies_.clear();
        refused_ = false;
        aborted_ = false;
    }

    void notifyAbortRequest() override { aborted_ = true; }

    void notifyDIMSEError(const OFCondition&) override { aborted_ = true; }

    void notifyAssociationTermination() override {
        if (calling_ae_.empty() && studies_.empty()) return;
        std::string list;
        for (const std::string& study : studies_) list += (list.empty() ? "" : ",") + study;
        std::string problem = aborted_ ? "association aborted" : (refused_ ? "instances refused" : "");
        emit("END\t" + clean(calling_ae_) + "\t" + problem + "\t" + list);
        calling_ae_.clear();
        studies_.clear();
    }

    OFCondition handleIncomingCommand(T_DIMSE_Message* message, const DcmPresentationContextInfo& info) override {
        if (message->CommandField == DIMSE_C_STORE_RQ)
            return handleStore(message->msg.CStoreRQ, info.presentationContextID);
        return DcmThreadSCP::handleIncomingCommand(message, info);
    }

  private:
    OFCondition handleStore(T_DIMSE_C_StoreRQ& request, T_ASC_PresentationContextID context) {
        std::string incoming = policy.incoming + "/" + std::to_string(sequence.fetch_add(1)) + ".tmp";
        OFCondition received = receiveSTORERequest(request, context, incoming.c_str());
        if (received.bad()) {
            ::unlink(incoming.c_str());
            return received;
        }
        double received_at = now();
        Uint16 status = 0;
        std::string reason, final_path, header;
        if (disk_low()) {
            status = STATUS_OUT_OF_RESOURCES;
            reason = "spool disk below its watermark";
        } else {
            Checked checked = check(incoming, request);
            status = checked.status;
            reason = checked.reason;
            header = checked.header;
            if (status == 0) status = place(incoming, checked, request, final_path, reason);
        }
        if (status != 0) {
            ::unlink(incoming.c_str());
            refused_ = true;
        } else {
            studies_.insert(final_path.substr(policy.spool.size() + 1, final_path.find('/', policy.spool.size() + 1) - policy.spool.size() - 1));
        }
        OFCondition answered = sendSTOREResponse(context, request, status);
        if (status == 0) {
            char when[32];
            std::snprintf(when, sizeof when, "%.6f", received_at);
            emit("STORED\t" + final_path + "\t" + clean(calling_ae_) + "\t" + when + (header.empty() ? "" : "\t") +
                 header);
        } else {
            char hex[8];
            std::snprintf(hex, sizeof hex, "%04X", status);
            emit(std::string("REFUSED\t") + hex + "\t" + clean(calling_ae_) + "\t" + clean(reason));
        }
        return answered;
    }

    // fsync the file, rename it into <study>/<series>/, fsync the folders: durable before the response.
    Uint16 place(const std::string& incoming, const Checked& checked, const T_DIMSE_C_StoreRQ& request,
                 std::string& final_path, std::string& reason) {
        std::string study = policy.spool + "/" + checked.study;
        std::string series = study + "/" + checked.series;
        final_path = series + "/" + trimmed(request.AffectedSOPInstanceUID) + ".dcm";
        if (!fsync_path(incoming, false) || !ensure_folder(study, policy.spool) || !ensure_folder(series, study) ||
            ::rename(incoming.c_str(), final_path.c_str()) != 0 || !fsync_path(series, true)) {
            reason = std::string("spool write failed: ") + std::strerror(errno);
            return errno == ENOSPC ? STATUS_OUT_OF_RESOURCES : STATUS_PROCESSING_FAILURE;
        }
        return 0;
    }

    std::string calling_ae_;
    std::set<std::string> studies_;
    bool refused_ = false;
    bool aborted_ = false;
};

std::atomic<unsigned long> associations{0};

// One association on a thread of its own, with the shared configuration.
void serve(T_ASC_Association* association, DcmSharedSCPConfig config) {
    {
        GatewaySCP scp;
        scp.setSharedConfig(config);
        scp.run(association);
    }
    associations.fetch_sub(1);
}

// A listening socket on host:port only (DCMTK 3.6 binds every interface; the gateway serves the one it is told).
int listen_on(const std::string& host, unsigned long port) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address;
    std::memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    if (::inet_pton(AF_INET, host.c_str(), &address.sin_addr) != 1 ||
        ::bind(fd, reinterpret_cast<struct sockaddr*>(&address), sizeof address) != 0 || ::listen(fd, 64) != 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

std::vector<std::string> split(const char* text) {
    std::vector<std::string> out;
    std::string item;
    for (const char* c = text;; ++c) {
        if (*c == ',' || *c == '\0') {
            if (!trimmed(item).empty()) out.push_back(trimmed(item));
            item.clear();
            if (*c == '\0') break;
        } else {
            item += *c;
        }
    }
    return out;
}

int usage() {
    std::fprintf(stderr,
                 "usage: gateway-storescp --spool DIR --incoming DIR --port N --sop-classes UID,...\n"
                 "       --transfer-syntaxes UID,...\n"
                 "       [--host ADDR] [--aet AE] [--allow-ae A,B]\n"
                 "       [--allow-address IP,IP] [--min-free-bytes N] [--max-pdu N] [--acse-timeout S]\n"
                 "       [--dimse-timeout S] [--max-associations N] [--tls-cert PEM --tls-key PEM [--tls-ca PEM]]\n"
                 "Started by the DICOM AI gateway (receiver engine \"native\"); see its README.\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    OFLog::configure(OFLogger::ERROR_LOG_LEVEL);
    ::setenv("TCP_NODELAY", "1", 1);  // dcmnet leaves Nagle's algorithm on unless told: ~20 images/s
    std::string host = "127.0.0.1", aet = "AI_GATEWAY";
    unsigned long port = 0, max_pdu = 16384, acse = 30, dimse = 60, max_associations = 64;
    std::vector<std::string> sop_classes, transfer_syntaxes;  // what the gateway accepts, from its settings
    std::string tls_cert, tls_key, tls_ca;  // DICOM TLS (BCP 195 profile); with a CA, callers need a certificate
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        if (i + 1 >= argc) return usage();
        const char* value = argv[++i];
        if (arg == "--spool") policy.spool = value;
        else if (arg == "--incoming") policy.incoming = value;
        else if (arg == "--port") port = std::strtoul(value, NULL, 10);
        else if (arg == "--host") host = value;
        else if (arg == "--aet") aet = value;
        else if (arg == "--allow-ae") for (const std::string& ae : split(value)) policy.calling_aes.insert(ae);
        else if (arg == "--allow-address") for (const std::string& ip : split(value)) policy.addresses.insert(ip);
        else if (arg == "--sop-classes") sop_classes = split(value);
        else if (arg == "--transfer-syntaxes") transfer_syntaxes = split(value);
        else if (arg == "--min-free-bytes") policy.min_free_bytes = std::strtoull(value, NULL, 10);
        else if (arg == "--max-pdu") max_pdu = std::strtoul(value, NULL, 10);
        else if (arg == "--acse-timeout") acse = std::strtoul(value, NULL, 10);
        else if (arg == "--dimse-timeout") dimse = std::strtoul(value, NULL, 10);
        else if (arg == "--max-associations") max_associations = std::strtoul(value, NULL, 10);
        else if (arg == "--tls-cert") tls_cert = value;
        else if (arg == "--tls-key") tls_key = value;
        else if (arg == "--tls-ca") tls_ca = value;
        else return usage();
    }
    if (policy.spool.empty() || policy.incoming.empty() || port == 0 || port > 65535 || sop_classes.empty() ||
        transfer_syntaxes.empty())
        return usage();
    ::mkdir(policy.spool.c_str(), 0700);
    ::mkdir(policy.incoming.c_str(), 0700);

    DcmSharedSCPConfig shared;
    DcmSCPConfig& config = *shared;
    config.setPort(static_cast<Uint16>(port));
    config.setAETitle(aet.c_str());
    config.setMaxReceivePDULength(static_cast<Uint32>(max_pdu));
    config.setACSETimeout(static_cast<Uint32>(acse));
    config.setDIMSETimeout(static_cast<Uint32>(dimse));
    config.setDIMSEBlockingMode(DIMSE_NONBLOCKING);
    config.setHostLookupEnabled(OFFalse);
    OFList<OFString> syntaxes;
    for (const std::string& ts : transfer_syntaxes) syntaxes.push_back(ts.c_str());
    OFList<OFString> verification;
    verification.push_back(UID_LittleEndianImplicitTransferSyntax);
    verification.push_back(UID_LittleEndianExplicitTransferSyntax);
    config.addPresentationContext(UID_VerificationSOPClass, verification);
    for (const std::string& sop_class : sop_classes) config.addPresentationContext(sop_class.c_str(), syntaxes);

    int listener = listen_on(host, port);
    if (listener < 0) {
        std::fprintf(stderr, "gateway-storescp: cannot listen on %s:%lu: %s\n", host.c_str(), port,
                     std::strerror(errno));
        return 1;
    }
    // The network's own listening socket (bound to every interface, on a port the system picks) is replaced by
    // ours, so DCMTK accepts on host:port only.
    T_ASC_Network* network = NULL;
    OFCondition made = ASC_initializeNetwork(NET_ACCEPTOR, 0, static_cast<int>(acse), &network);
    if (made.bad()) {
        std::fprintf(stderr, "gateway-storescp: %s\n", made.text());
        return 1;
    }
    PRIVATE_NETWORKKEY* key = reinterpret_cast<PRIVATE_NETWORKKEY*>(network->network);
    if (::dup2(listener, key->networkSpecific.TCP.listenSocket) < 0) {
        std::fprintf(stderr, "gateway-storescp: cannot take over the listening socket: %s\n", std::strerror(errno));
        return 1;
    }
    ::close(listener);

    const bool secure = !tls_cert.empty();
    if (secure) {
        DcmTLSTransportLayer* tls = new DcmTLSTransportLayer(NET_ACCEPTOR, NULL, OFTrue);
        OFCondition ok = tls->setTLSProfile(TSP_Profile_BCP195);
        if (ok.good()) ok = tls->activateCipherSuites();
        if (ok.good()) ok = tls->setPrivateKeyFile(tls_key.c_str(), DCF_Filetype_PEM);
        if (ok.good()) ok = tls->setCertificateFile(tls_cert.c_str(), DCF_Filetype_PEM);
        if (ok.good() && !tls->checkPrivateKeyMatchesCertificate())
            ok = makeOFCondition(0, 1, OF_error, "the TLS key does not match the certificate");
        if (ok.good() && !tls_ca.empty()) ok = tls->addTrustedCertificateFile(tls_ca.c_str(), DCF_Filetype_PEM);
        tls->setCertificateVerification(tls_ca.empty() ? DCV_ignoreCertificate : DCV_requireCertificate);
        if (ok.good()) ok = ASC_setTransportLayer(network, tls, 1);
        if (ok.bad()) {
            std::fprintf(stderr, "gateway-storescp: TLS cannot be set up: %s\n", ok.text());
            return 1;
        }
    }

    // The gateway closing our stdin (or dying) stops us.
    std::thread watch([] {
        char buffer[64];
        while (::read(STDIN_FILENO, buffer, sizeof buffer) > 0) {
        }
        std::_Exit(0);
    });
    watch.detach();
    signal(SIGTERM, [](int) { std::_Exit(0); });
    signal(SIGPIPE, SIG_IGN);

    emit("READY\t" + std::to_string(port));
    for (;;) {
        T_ASC_Association* association = NULL;
        OFCondition received = ASC_receiveAssociation(network, &association, static_cast<long>(max_pdu), NULL,
                                                      NULL, secure ? OFTrue : OFFalse, DUL_BLOCK, 0);
        if (received.bad()) {  // a connection that never sent a valid A-ASSOCIATE-RQ
            if (association != NULL) {
                ASC_dropSCPAssociation(association);
                ASC_destroyAssociation(&association);
            }
            continue;
        }
        if (associations.load() >= max_associations) {
            T_ASC_RejectParameters busy = {ASC_RESULT_REJECTEDTRANSIENT, ASC_SOURCE_SERVICEPROVIDER_PRESENTATION_RELATED,
                                           ASC_REASON_SP_PRES_LOCALLIMITEXCEEDED};
            ASC_rejectAssociation(association, &busy);
            ASC_dropSCPAssociation(association);
            ASC_destroyAssociation(&association);
            continue;
        }
        associations.fetch_add(1);
        std::thread(serve, association, shared).detach();
    }
}
