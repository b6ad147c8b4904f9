// The gateway's native C-STORE receiver (DCMTK): DICOM networking at C++ speed, with the gateway's rule kept -
// an instance is acknowledged only once it is durable: in the spool, its file and its folder fsynced, or (--journal)
// in its journal, fdatasync'ed (see "The journal" below).
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
//   REPLAYED <path> <calling AE> <received at>  (with a journal, before READY: an instance acknowledged before a
//          crash, put in the spool from the journal; the gateway reads its header, and skips it if processed)
//   REFUSED <status hex> <calling AE> <reason>
//   END <calling AE> <problem: "" | association aborted | instances refused> <study UIDs, comma-separated>
// It exits when its stdin closes (the gateway is gone) and on SIGTERM; it also asks the kernel for SIGTERM when its
// parent dies.

#include "dcmtk/config/osconfig.h"
#include "dcmtk/dcmdata/dcdeftag.h"
#include "dcmtk/dcmdata/dcfilefo.h"
#include "dcmtk/dcmdata/dcistrmb.h"
#include "dcmtk/dcmdata/dcostrma.h"
#include "dcmtk/dcmdata/dcuid.h"
#include "dcmtk/dcmnet/diutil.h"
#include "dcmtk/dcmnet/dulstruc.h"
#include "dcmtk/dcmnet/scpthrd.h"
#include "dcmtk/dcmtls/tlslayer.h"
#include "dcmtk/oflog/oflog.h"

#include <atomic>
#include <condition_variable>
#include <deque>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
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
int dimse_timeout = 60;

// --profile: where the time of each acknowledged C-STORE goes (printed to stderr at a clean stop), the
// benchmark's explanation of the gap to storescp. Clock reads only; nothing changes without the flag.
struct Profile {
    bool on = false;
    std::atomic<long long> instances{0}, wait_ns{0}, waits{0}, receive_ns{0}, check_ns{0}, durable_ns{0},
        respond_ns{0};

    static long long clock_ns() {
        return std::chrono::duration_cast<std::chrono::nanoseconds>(
                   std::chrono::steady_clock::now().time_since_epoch())
            .count();
    }

    // The four phases of one instance, from five clock readings; and the wait before it since the association's
    // previous response (the sender reading its next file and sending its command: not the receiver's time).
    void add(long long t0, long long t1, long long t2, long long t3, long long t4) {
        if (!on) return;
        static thread_local long long previous_end = 0;  // one thread per association
        if (previous_end != 0) {
            wait_ns += t0 - previous_end;
            waits++;
        }
        previous_end = t4;
        instances++;
        receive_ns += t1 - t0;
        check_ns += t2 - t1;
        durable_ns += t3 - t2;
        respond_ns += t4 - t3;
    }

    void print() const {
        long long n = instances.load();
        if (!on || n == 0) return;
        std::fprintf(stderr,
                     "PROFILE\tinstances=%lld\twait_ms=%.3f\treceive_ms=%.3f\tcheck_ms=%.3f\tdurable_ms=%.3f\t"
                     "respond_ms=%.3f\n",
                     n, waits ? wait_ns / 1e6 / waits : 0.0, receive_ns / 1e6 / n, check_ns / 1e6 / n,
                     durable_ns / 1e6 / n, respond_ns / 1e6 / n);
        std::fflush(stderr);
    }
};

Profile profile;
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

Checked check_dataset(DcmDataset* ds, const T_DIMSE_C_StoreRQ& request);

// The stored file's header, checked as the Python spool checks it.
Checked check(const std::string& path, const T_DIMSE_C_StoreRQ& request) {
    DcmFileFormat file;
    // Values longer than 4 KiB (the pixel data) are skipped, not read: the header costs what storescp's does.
    OFCondition read = file.loadFile(path.c_str(), EXS_Unknown, EGL_noChange, 4096, ERM_autoDetect);
    if (read.bad()) {
        Checked out;
        out.status = STATUS_CANNOT_UNDERSTAND;
        out.reason = std::string("dataset cannot be parsed: ") + read.text();
        return out;
    }
    return check_dataset(file.getDataset(), request);
}

// The same, of a file's bytes in memory (the journal's path).
Checked check_bytes(const std::string& bytes, const T_DIMSE_C_StoreRQ& request) {
    DcmFileFormat file;
    DcmInputBufferStream stream;
    stream.setBuffer(bytes.data(), static_cast<offile_off_t>(bytes.size()));
    stream.setEos();
    file.transferInit();
    OFCondition read = file.read(stream, EXS_Unknown, EGL_noChange, 4096);
    file.transferEnd();
    if (read.bad()) {
        Checked out;
        out.status = STATUS_CANNOT_UNDERSTAND;
        out.reason = std::string("dataset cannot be parsed: ") + read.text();
        return out;
    }
    return check_dataset(file.getDataset(), request);
}

Checked check_dataset(DcmDataset* ds, const T_DIMSE_C_StoreRQ& request) {
    Checked out;
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


// ---------------------------------------------------------------------------------------------------------------
// The journal (--journal FILE --journal-bytes N): fewer syncs per instance, still "acknowledged = durable".
//
// The journal (--journal): fewer, cheaper syncs per acknowledgement than a file per instance.
//
// A C-STORE's data set is received into memory (bit-preserving, behind a file meta header built from the
// request) and, as it arrives, into a slot reserved for it in a pre-written journal file: every 256 KiB is written
// there and handed to the disk at once (sync_file_range), so most of the instance is on disk by its last PDV. The
// instance is checked, its record written into the slot, and the journal fdatasync'ed (associations share one
// fdatasync: group commit) - only then is the response sent, and the association's thread is free for the next
// instance. A writer thread copies the instance from its slot to <spool>/<study>/<series>/<sop>.dcm (in the
// kernel; temporary name, rename; its write-back started at once) and emits STORED; a settler thread syncs the file
// system (syncfs) every batch and advances the journal's checkpoint, after which the slots are reused. Nothing
// waits in memory for the writer: an association holds one instance at a time, and what the writer has yet to copy
// is in the journal (full, instances take the direct path). At start, the records past the checkpoint are written
// to the spool again and reported (REPLAYED) before READY: an instance acknowledged before a crash is in the spool
// after it, whatever had happened to its file.
//
// Layout: a 4 KiB header (magic, checkpoint sequence, offset of the slot after it), then slots in sequence order,
// 4 KiB aligned, wrapping to the start. A slot: a 64-byte slot header, written when the slot is reserved (magic,
// sequence, the slot's length, CRC-32C); a 64-byte record header, written when the instance is committed (magic,
// sequence, lengths, received time, CRC-32C of the body and of the header itself); the spool path and the calling AE
// title; and, from 4 KiB on, the file's bytes. Replay walks the slots from the checkpoint by sequence: a slot whose
// record header is missing or torn, or whose body's CRC is wrong, was never acknowledged (its fdatasync had not
// returned) and is skipped; the walk ends where the next sequence's slot header is not. A slot header is written
// while the reservation is made, so the fdatasync that acknowledges any later slot makes it durable too: the walk
// cannot end before an acknowledged slot, however long an earlier one takes to arrive (a slow sender holds up no
// other association). A slot header is rewritten only to shorten the last slot, before any later one exists. An
// instance that does not fit (the settler is behind; larger than a quarter of the journal) takes the direct path:
// its own file fsynced, renamed, folder fsynced.

const char JOURNAL_MAGIC[8] = {'G', 'W', 'J', 'R', 'N', 'L', '0', '2'};
const char OLD_JOURNAL_MAGIC[8] = {'G', 'W', 'J', 'R', 'N', 'L', '0', '1'};  // format 1 (slots without headers)
const char SLOT_MAGIC[8] = {'G', 'W', 'S', 'L', 'O', 'T', '0', '2'};
const char RECORD_MAGIC[8] = {'G', 'W', 'R', 'E', 'C', 'D', '0', '2'};
const uint64_t JOURNAL_HEADER = 4096, RECORD_ALIGN = 4096;
const uint64_t SLOT_DATA = 4096;           // where a slot's file bytes start; its headers, path and AE title before
const uint64_t STREAM_CHUNK = 256 << 10;   // written and handed to the disk while the rest is still arriving
const uint64_t FIRST_ESTIMATE = 1 << 20;   // a slot for an association's first instance (its size is not known)

uint32_t crc_table[256];

void crc_init() {
    for (uint32_t i = 0; i < 256; ++i) {
        uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // CRC-32C (Castagnoli)
        crc_table[i] = c;
    }
}

uint32_t crc_software(uint32_t crc, const unsigned char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) crc = crc_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc_hardware(uint32_t crc, const unsigned char* p, size_t n) {
    uint64_t c = crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t word;
        std::memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
    }
    uint32_t c32 = static_cast<uint32_t>(c);
    for (; n > 0; --n, ++p) c32 = __builtin_ia32_crc32qi(c32, *p);
    return c32;
}
#endif

uint32_t crc32c(uint32_t crc, const void* data, size_t n) {
    const unsigned char* p = static_cast<const unsigned char*>(data);
    crc = ~crc;
#if defined(__x86_64__)
    static const bool hardware = __builtin_cpu_supports("sse4.2");
    crc = hardware ? crc_hardware(crc, p, n) : crc_software(crc, p, n);
#else
    crc = crc_software(crc, p, n);
#endif
    return ~crc;
}

struct SlotHeader {  // 64 bytes on disk, little-endian host order (the journal never leaves this machine)
    char magic[8];
    uint64_t seq;
    uint64_t span;  // the slot's length: the next slot starts here (or, wrapped, at the journal's start)
    uint32_t crc;   // of the 28 bytes before it
    char reserved[36];
};
static_assert(sizeof(SlotHeader) == 64, "slot header is 64 bytes");

struct RecordHeader {  // 64 bytes, just after the slot header
    char magic[8];
    uint64_t seq;
    uint64_t data_length;
    uint32_t path_length;
    uint32_t calling_length;
    double received_at;
    uint32_t body_crc;    // of the data, then the path, then the calling AE
    uint32_t header_crc;  // of the 48 bytes before it
    char reserved[16];
};
static_assert(sizeof(RecordHeader) == 64, "record header is 64 bytes");
const uint64_t SLOT_META = SLOT_DATA - sizeof(SlotHeader) - sizeof(RecordHeader);  // room for path + AE title

struct JournalHeader {
    char magic[8];
    uint64_t checkpoint_seq;  // every record up to this one is in the spool, durably
    uint64_t next_offset;     // where the slot after it starts (or, if it is not there, the journal's start)
    uint32_t crc;
};

uint64_t aligned(uint64_t n) { return (n + RECORD_ALIGN - 1) / RECORD_ALIGN * RECORD_ALIGN; }

// All of n bytes at offset with pread / pwrite, through short transfers and EINTR; false on an error or EOF.
template <typename Buffer, typename Transfer>
bool transfer_all(Transfer transfer, int fd, Buffer* data, size_t n, uint64_t offset) {
    while (n > 0) {
        ssize_t done = transfer(fd, data, n, static_cast<off_t>(offset));
        if (done <= 0) {
            if (done < 0 && errno == EINTR) continue;
            return false;
        }
        data += done;
        n -= static_cast<size_t>(done);
        offset += static_cast<uint64_t>(done);
    }
    return true;
}

bool write_all(int fd, const void* data, size_t n, uint64_t offset) {
    return transfer_all(::pwrite, fd, static_cast<const char*>(data), n, offset);
}

bool read_all(int fd, void* data, size_t n, uint64_t offset) {
    return transfer_all(::pread, fd, static_cast<char*>(data), n, offset);
}

struct Replayed {
    std::string path, calling_ae;
    double received_at;
};

// Where one instance goes in the journal. span 0: none (the direct path).
struct Slot {
    uint64_t seq = 0, offset = 0, span = 0;
    uint64_t capacity() const { return span > SLOT_DATA ? span - SLOT_DATA : 0; }  // bytes of file it holds
};

class Journal {
  public:
    bool open(const std::string& path, uint64_t bytes, std::string& error) {
        size_ = bytes / RECORD_ALIGN * RECORD_ALIGN;
        fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd_ < 0) return fail(error, "cannot open the journal");
        struct stat st;
        if (::fstat(fd_, &st) != 0) return fail(error, "cannot stat the journal");
        char magic[8] = {0};
        if (st.st_size >= 8 && read_all(fd_, magic, 8, 0) && std::memcmp(magic, OLD_JOURNAL_MAGIC, 8) == 0) {
            errno = EPROTO;
            return fail(error, "written by an earlier receiver (journal format 1); start that version once to put "
                               "its instances in the spool, or remove the file if the spool already has them");
        }
        if (static_cast<uint64_t>(st.st_size) < size_) {  // written out once: later overwrites allocate nothing
            std::vector<char> zeros(1 << 20, 0);
            for (uint64_t at = static_cast<uint64_t>(st.st_size); at < size_; at += zeros.size())
                if (!write_all(fd_, zeros.data(), std::min<uint64_t>(zeros.size(), size_ - at), at))
                    return fail(error, "cannot write the journal out");
            if (::fsync(fd_) != 0) return fail(error, "cannot fsync the journal");
        } else {
            size_ = static_cast<uint64_t>(st.st_size) / RECORD_ALIGN * RECORD_ALIGN;
        }
        return true;
    }

    // The records past the checkpoint, in order, each with its bytes written to the spool (temporary name, rename).
    bool replay(std::vector<Replayed>& out, std::string& error) {
        JournalHeader header;
        std::memset(&header, 0, sizeof header);
        uint64_t seq = 0, offset = JOURNAL_HEADER;
        if (read_all(fd_, &header, sizeof header, 0) && std::memcmp(header.magic, JOURNAL_MAGIC, 8) == 0 &&
            header.crc == crc32c(0, &header, offsetof(JournalHeader, crc))) {
            seq = header.checkpoint_seq;
            offset = header.next_offset;
        }
        std::string meta, data;
        for (;;) {
            SlotHeader slot;
            uint64_t at = offset;
            if (!slot_at(at, seq + 1, slot) && !(at = JOURNAL_HEADER, slot_at(at, seq + 1, slot))) break;
            RecordHeader record;
            if (committed(at, slot, record, meta, data)) {
                std::string path = meta.substr(0, record.path_length), calling = meta.substr(record.path_length);
                if (!spool_path_ok(path) || !write_instance(path, data.data(), data.size())) {
                    error = "cannot write a journalled instance to " + path + ": " + std::strerror(errno);
                    return false;
                }
                out.push_back(Replayed{path, calling, record.received_at});
            }  // else never acknowledged: skipped
            seq = slot.seq;
            offset = at + slot.span;
        }
        if (!out.empty() && ::syncfs(fd_) != 0) return fail(error, "syncfs failed");
        next_seq_ = seq + 1;  // the sequence goes on from here
        return checkpoint_to(seq, JOURNAL_HEADER, error);
    }

    // A slot for an instance of about `estimate` bytes (at most a quarter of the journal), its slot header written;
    // false when the journal is full (or broken). Every slot is later committed or abandoned.
    bool reserve(uint64_t estimate, Slot& slot) {
        uint64_t need = std::min(SLOT_DATA + aligned(estimate), size_ / 4 / RECORD_ALIGN * RECORD_ALIGN);
        std::lock_guard<std::mutex> guard(lock_);
        if (broken_ || need <= SLOT_DATA) return false;
        uint64_t start = live_.empty() ? JOURNAL_HEADER : head_;
        if (!live_.empty()) {
            uint64_t oldest = live_.front().offset;
            if (start >= oldest) {  // not wrapped: to the end, else from the start up to the oldest slot
                if (start + need > size_) {
                    if (JOURNAL_HEADER + need > oldest) return false;
                    start = JOURNAL_HEADER;
                }
            } else if (start + need > oldest) {
                return false;
            }
        }
        slot.seq = next_seq_;
        slot.offset = start;
        slot.span = need;
        if (!write_slot_header(slot)) {  // under the lock: before any later slot's header, and its fdatasync
            broken_ = true;
            return false;
        }
        ++next_seq_;
        head_ = start + need;
        live_.push_back(Live{slot.seq, start, false});
        return true;
    }

    // Bytes of the file at `at` in the slot; `hand_off`: start writing them to the disk now, without waiting.
    bool write_data(const Slot& slot, uint64_t at, const char* data, uint64_t length, bool hand_off) {
        uint64_t offset = slot.offset + SLOT_DATA + at;
        if (!write_all(fd_, data, length, offset)) return false;
        if (hand_off)
            ::sync_file_range(fd_, static_cast<off_t>(offset), static_cast<off_t>(length), SYNC_FILE_RANGE_WRITE);
        return true;
    }

    // The last slot made no longer than `length` bytes of file need (the space after it is free again).
    void shrink(Slot& slot, uint64_t length) {
        uint64_t need = SLOT_DATA + aligned(length);
        std::lock_guard<std::mutex> guard(lock_);
        if (broken_ || need >= slot.span || head_ != slot.offset + slot.span) return;
        Slot shorter = slot;
        shorter.span = need;
        if (!write_slot_header(shorter)) return;  // the longer slot stands: replay skips its tail
        slot.span = need;
        head_ = slot.offset + need;
    }

    // The instance's record written into its slot (its first `streamed` bytes are there already); true once it and
    // everything written before it are durable (then it may be acknowledged). False: it does not fit, or the
    // journal failed (the caller abandons the slot and takes the direct path).
    bool commit(const Slot& slot, uint64_t streamed, double received_at, const std::string& path,
                const std::string& calling, const std::string& data) {
        RecordHeader header;
        std::memset(&header, 0, sizeof header);
        std::memcpy(header.magic, RECORD_MAGIC, 8);
        header.received_at = received_at;
        header.seq = slot.seq;
        header.data_length = data.size();
        header.path_length = static_cast<uint32_t>(path.size());
        header.calling_length = static_cast<uint32_t>(calling.size());
        uint32_t crc = crc32c(0, data.data(), data.size());
        crc = crc32c(crc, path.data(), path.size());
        header.body_crc = crc32c(crc, calling.data(), calling.size());
        header.header_crc = crc32c(0, &header, offsetof(RecordHeader, header_crc));
        std::string record(reinterpret_cast<const char*>(&header), sizeof header);
        record += path;
        record += calling;
        if (data.size() > slot.capacity() || path.size() + calling.size() > SLOT_META || streamed % RECORD_ALIGN != 0)
            return false;
        // The tail from the last whole page streamed, zero-padded to whole pages (the slot has the room).
        uint64_t tail = data.size() - streamed;
        std::string padded(data, streamed, tail);
        padded.resize(aligned(tail), '\0');
        std::string block = first_block(slot, record);
        bool ok = write_data(slot, streamed, padded.data(), padded.size(), false) &&
                  write_all(fd_, block.data(), block.size(), slot.offset);
        if (!ok) return false;
        std::unique_lock<std::mutex> guard(lock_);
        // Group commit: any fdatasync that starts after this point covers this record.
        uint64_t ticket = ++written_;
        while (!broken_ && synced_ < ticket) {
            if (syncing_) {
                synced_cv_.wait(guard);
                continue;
            }
            syncing_ = true;
            uint64_t target = written_;
            guard.unlock();
            bool synced = ::fdatasync(fd_) == 0;
            guard.lock();
            syncing_ = false;
            if (synced) synced_ = std::max(synced_, target);
            else broken_ = true;
            synced_cv_.notify_all();
        }
        return !broken_;
    }

    // A slot that will hold no instance (refused, failed, the association gone, or too small): replay skips it,
    // and the checkpoint may pass it.
    void abandon(const Slot& slot) {
        if (slot.span == 0) return;
        std::lock_guard<std::mutex> guard(lock_);
        mark_retired(slot.seq);  // retired with no instance: nothing to write, nothing to replay
    }

    // These records' instances are in the spool and the file system synced: move the checkpoint past every slot up
    // to the first one not retired yet, then free their space.
    void retire(const std::vector<uint64_t>& seqs) {
        std::unique_lock<std::mutex> guard(lock_);
        for (uint64_t seq : seqs) mark_retired(seq);
        uint64_t upto = 0;
        size_t count = 0;
        for (const Live& live : live_) {
            if (!live.retired) break;
            upto = live.seq;
            ++count;
        }
        if (count == 0) return;
        uint64_t next = count < live_.size() ? live_[count].offset : head_;
        guard.unlock();
        std::string error;
        if (!checkpoint_to(upto, next, error)) {
            std::fprintf(stderr, "gateway-storescp: journal checkpoint failed: %s\n", error.c_str());
            return;  // the space stays taken; replay writes those instances again (harmless)
        }
        guard.lock();
        while (!live_.empty() && live_.front().retired && live_.front().seq <= upto) live_.pop_front();
    }

    int fd() const { return fd_; }
    uint64_t capacity() const { return size_; }

  private:
    struct Live {
        uint64_t seq, offset;
        bool retired;
    };

    bool fail(std::string& error, const char* what) {
        error = std::string(what) + ": " + std::strerror(errno);
        return false;
    }

    void mark_retired(uint64_t seq) {
        for (Live& live : live_)
            if (live.seq == seq) live.retired = true;
    }

    // A slot's first block: its slot header, then (committed) its record header, path and AE title, zeros after.
    // Always written whole, like every journal write: a partial page not in memory would be read from the disk
    // first.
    std::string first_block(const Slot& slot, const std::string& record = std::string()) {
        SlotHeader header;
        std::memset(&header, 0, sizeof header);
        std::memcpy(header.magic, SLOT_MAGIC, 8);
        header.seq = slot.seq;
        header.span = slot.span;
        header.crc = crc32c(0, &header, offsetof(SlotHeader, crc));
        std::string block(reinterpret_cast<const char*>(&header), sizeof header);
        block += record;
        block.resize(SLOT_DATA, '\0');
        return block;
    }

    bool write_slot_header(const Slot& slot) {
        std::string block = first_block(slot);
        return write_all(fd_, block.data(), block.size(), slot.offset);
    }

    bool slot_at(uint64_t offset, uint64_t seq, SlotHeader& slot) {
        if (offset + sizeof slot > size_ || !read_all(fd_, &slot, sizeof slot, offset)) return false;
        if (std::memcmp(slot.magic, SLOT_MAGIC, 8) != 0 || slot.seq != seq) return false;
        if (slot.crc != crc32c(0, &slot, offsetof(SlotHeader, crc))) return false;
        return slot.span > SLOT_DATA && slot.span % RECORD_ALIGN == 0 && offset + slot.span <= size_;
    }

    // The slot's record, when it was committed whole: its path + AE title and its file's bytes.
    bool committed(uint64_t offset, const SlotHeader& slot, RecordHeader& record, std::string& meta,
                   std::string& data) {
        if (!read_all(fd_, &record, sizeof record, offset + sizeof slot)) return false;
        if (std::memcmp(record.magic, RECORD_MAGIC, 8) != 0 || record.seq != slot.seq) return false;
        if (record.header_crc != crc32c(0, &record, offsetof(RecordHeader, header_crc))) return false;
        if (uint64_t(record.path_length) + record.calling_length > SLOT_META || record.calling_length > 64 ||
            record.data_length > slot.span - SLOT_DATA)
            return false;
        meta.resize(record.path_length + record.calling_length);
        data.resize(record.data_length);
        if (!read_all(fd_, &meta[0], meta.size(), offset + sizeof slot + sizeof record) ||
            !read_all(fd_, &data[0], data.size(), offset + SLOT_DATA))
            return false;
        uint32_t crc = crc32c(crc32c(0, data.data(), data.size()), meta.data(), meta.size());
        return crc == record.body_crc;  // else torn by a crash before its fdatasync returned
    }

    bool spool_path_ok(const std::string& path) {
        return path.compare(0, policy.spool.size() + 1, policy.spool + "/") == 0 &&
               path.find("/..") == std::string::npos && path.size() > 4 && path.substr(path.size() - 4) == ".dcm";
    }

    bool write_instance(const std::string& path, const char* data, uint64_t length);

    bool checkpoint_to(uint64_t seq, uint64_t next, std::string& error) {
        JournalHeader header;
        std::memset(&header, 0, sizeof header);
        std::memcpy(header.magic, JOURNAL_MAGIC, 8);
        header.checkpoint_seq = seq;
        header.next_offset = next;
        header.crc = crc32c(0, &header, offsetof(JournalHeader, crc));
        std::lock_guard<std::mutex> guard(checkpoint_lock_);
        if (!write_all(fd_, &header, sizeof header, 0) || ::fdatasync(fd_) != 0)
            return fail(error, "cannot write the journal's checkpoint");
        return true;
    }

    int fd_ = -1;
    uint64_t size_ = 0;
    std::mutex lock_, checkpoint_lock_;
    std::condition_variable synced_cv_;
    uint64_t next_seq_ = 1, head_ = JOURNAL_HEADER;
    std::deque<Live> live_;
    uint64_t written_ = 0, synced_ = 0;  // group commit: tickets handed out, and covered by a finished fdatasync
    bool syncing_ = false, broken_ = false;
};

Journal* journal = NULL;

// The folders of a spool path (made when missing; fsynced only on the direct path, where no journal covers them).
bool make_folders(const std::string& path, bool sync) {
    size_t series_end = path.rfind('/');
    size_t study_end = path.rfind('/', series_end - 1);
    std::string series = path.substr(0, series_end), study = path.substr(0, study_end);
    if (sync) return ensure_folder(study, policy.spool) && ensure_folder(series, study);
    if (::mkdir(study.c_str(), 0700) != 0 && errno != EEXIST) return false;
    return ::mkdir(series.c_str(), 0700) == 0 || errno == EEXIST;
}

// `length` bytes from `from` at `offset` to the start of `to`, in the kernel (copy_file_range: page cache to page
// cache); read and written here where the kernel cannot.
bool copy_all(int from, uint64_t offset, int to, uint64_t length) {
    loff_t in = static_cast<loff_t>(offset), out = 0;
    while (out < static_cast<loff_t>(length)) {
        ssize_t n = ::copy_file_range(from, &in, to, &out, static_cast<size_t>(length - out), 0);
        if (n > 0) continue;
        if (n == 0 || (errno != EXDEV && errno != ENOSYS && errno != EOPNOTSUPP && errno != EINVAL)) return false;
        std::string rest(length - out, '\0');
        return read_all(from, &rest[0], rest.size(), static_cast<uint64_t>(in)) &&
               write_all(to, rest.data(), rest.size(), static_cast<uint64_t>(out));
    }
    return true;
}

// An instance's bytes - in memory, or (`data` NULL) in the journal at `source_offset` - to its spool path under a
// temporary name, then renamed: a reader never sees half a file.
bool write_file(const std::string& path, const char* data, uint64_t length, bool sync, int source_fd = -1,
                uint64_t source_offset = 0) {
    if (!make_folders(path, sync)) return false;
    size_t slash = path.rfind('/');
    // Hidden and ending in .tmp, as the Python spool names its own: its start-up removes a crash's leftover.
    std::string temporary = path.substr(0, slash + 1) + "." + path.substr(slash + 1) + ".tmp";
    int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return false;
    bool ok = (data != NULL ? write_all(fd, data, length, 0) : copy_all(source_fd, source_offset, fd, length)) &&
              (!sync || ::fsync(fd) == 0);
    // Unsynced (the journal holds it): its write-back starts now, so the batch's syncfs is not one burst that the
    // acknowledgements' fdatasync would queue behind.
    if (ok && !sync) ::sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    ok = (::close(fd) == 0) && ok;
    if (!ok || ::rename(temporary.c_str(), path.c_str()) != 0) {
        int saved = errno;
        ::unlink(temporary.c_str());
        errno = saved;
        return false;
    }
    return !sync || fsync_path(path.substr(0, path.rfind('/')), true);
}

bool Journal::write_instance(const std::string& path, const char* data, uint64_t length) {
    return write_file(path, data, length, false);
}

// Fault injection for the crash tests: acknowledged instances are not written to the spool (only the journal
// holds them), and no STORED or END event is emitted for them.
const bool spool_writes_paused = std::getenv("GATEWAY_STORESCP_PAUSE_WRITER") != NULL;

// After an acknowledgement from the journal, the writer (below) puts the instance in the spool (temporary name,
// rename: no sync) and emits STORED. The settler thread makes those files durable in batches - one syncfs every
// SETTLE_MS, or once they fill a quarter of the journal - and then lets the journal reuse their slots.
class Settler {
  public:
    // Seldom enough that the batch syncs do not slow the acknowledgements' fdatasync.
    static const int SETTLE_MS = 1000;

    void start() { std::thread([this] { run(); }).detach(); }

    // An instance is in the spool, not synced yet: its slot is freed after the next batch.
    void written(uint64_t seq, uint64_t bytes) {
        std::lock_guard<std::mutex> guard(lock_);
        if (seqs_.empty()) first_ = std::chrono::steady_clock::now();
        seqs_.push_back(seq);
        bytes_ += bytes;
        if (bytes_ >= journal->capacity() / 4) ready_.notify_one();
        else if (seqs_.size() == 1) ready_.notify_one();  // the batch's clock starts
    }

    // Until what was written is synced (a clean stop), or `seconds` passed.
    void drain(int seconds) {
        std::unique_lock<std::mutex> guard(lock_);
        draining_ = true;
        ready_.notify_all();
        idle_.wait_for(guard, std::chrono::seconds(seconds), [this] { return seqs_.empty() && !settling_; });
    }

  private:
    void run() {
        for (;;) {
            std::vector<uint64_t> batch;
            {
                std::unique_lock<std::mutex> guard(lock_);
                if (seqs_.empty()) {
                    idle_.notify_all();
                    ready_.wait(guard);
                    continue;
                }
                auto due = first_ + std::chrono::milliseconds(SETTLE_MS);
                if (!draining_ && bytes_ < journal->capacity() / 4 && std::chrono::steady_clock::now() < due) {
                    ready_.wait_until(guard, due);
                    continue;
                }
                batch.swap(seqs_);
                bytes_ = 0;
                settling_ = true;
            }
            if (::syncfs(journal->fd()) == 0) {
                journal->retire(batch);
            } else {  // the journal keeps them; the next start writes them again
                std::fprintf(stderr, "gateway-storescp: syncfs failed: %s\n", std::strerror(errno));
            }
            std::lock_guard<std::mutex> guard(lock_);
            settling_ = false;
            idle_.notify_all();
        }
    }

    std::mutex lock_;
    std::condition_variable ready_, idle_;
    std::vector<uint64_t> seqs_;  // written, not synced yet
    uint64_t bytes_ = 0;
    std::chrono::steady_clock::time_point first_;
    bool draining_ = false, settling_ = false;
};

Settler settler;

// With a journal, what follows an acknowledgement is a writer thread's: it copies the instance from its journal
// slot to the spool (copy_file_range, in the kernel, from the page cache; temporary name, rename, no sync), hands
// it to the settler and emits STORED. The association's thread is free for its next instance as soon as it has
// answered, and holds nothing: the slot keeps the bytes until the settler retires it, so what waits for the writer
// is bounded by the journal (full, instances take the direct path). Every event line of an association goes
// through the same queue, in order, so its END follows its instances' STORED.
class SpoolWriter {
  public:
    struct Task {
        uint64_t seq = 0, offset = 0, length = 0;  // the instance in the journal (length 0: a line only)
        std::string path, line;
    };

    void start() { std::thread([this] { run(); }).detach(); }

    void push(Task task) {
        std::lock_guard<std::mutex> guard(lock_);
        tasks_.push_back(std::move(task));
        ready_.notify_one();
    }

    void line(const std::string& text) {
        Task task;
        task.line = text;
        push(std::move(task));
    }

    // Until every task is done (a clean stop), or `seconds` passed.
    void drain(int seconds) {
        std::unique_lock<std::mutex> guard(lock_);
        idle_.wait_for(guard, std::chrono::seconds(seconds), [this] { return tasks_.empty() && !busy_; });
    }

  private:
    void run() {
        for (;;) {
            Task task;
            {
                std::unique_lock<std::mutex> guard(lock_);
                ready_.wait(guard, [this] { return !tasks_.empty(); });
                task = std::move(tasks_.front());
                tasks_.pop_front();
                busy_ = true;
            }
            if (task.length == 0) {
                emit(task.line);
            } else if (write_file(task.path, NULL, task.length, false, journal->fd(), task.offset)) {
                settler.written(task.seq, task.length);
                emit(task.line);
            } else {  // the journal still holds it; the next start writes it. Said, and the event withheld.
                std::fprintf(stderr, "gateway-storescp: cannot write %s: %s\n", task.path.c_str(),
                             std::strerror(errno));
            }
            std::lock_guard<std::mutex> guard(lock_);
            busy_ = false;
            if (tasks_.empty()) idle_.notify_all();
        }
    }

    std::mutex lock_;
    std::condition_variable ready_, idle_;
    std::deque<Task> tasks_;
    bool busy_ = false;
};

SpoolWriter writer;

// An association's event line: in order with its instances' STORED (through the writer, with a journal).
void emit_in_order(const std::string& line) {
    if (journal != NULL) writer.line(line);
    else emit(line);
}

// Receives a data set into memory, exactly as sent, behind the file meta header the file will have; with a journal
// slot, also into the slot as it comes (each STREAM_CHUNK written and handed to the disk at once) until it
// outgrows the slot.
class MemoryConsumer : public DcmConsumer {
  public:
    explicit MemoryConsumer(std::string& out, const Slot* slot = NULL) : out_(out), slot_(slot) {}
    OFBool good() const override { return OFTrue; }
    OFCondition status() const override { return EC_Normal; }
    OFBool isFlushed() const override { return OFTrue; }
    offile_off_t avail() const override { return 1 << 30; }
    offile_off_t write(const void* buf, offile_off_t buflen) override {
        out_.append(static_cast<const char*>(buf), static_cast<size_t>(buflen));
        if (streaming() && out_.size() > slot_->capacity()) streamed_ = 0, slot_ = NULL;  // written whole later
        if (streaming() && out_.size() - streamed_ >= STREAM_CHUNK) {  // whole pages only
            uint64_t upto = out_.size() / RECORD_ALIGN * RECORD_ALIGN;
            if (journal_write(upto)) streamed_ = upto;
            else streamed_ = 0, slot_ = NULL;
        }
        return buflen;
    }
    void flush() override {}

    bool streaming() const { return slot_ != NULL; }
    uint64_t streamed() const { return streamed_; }  // the first bytes, in the slot already

  private:
    bool journal_write(uint64_t upto);

    std::string& out_;
    const Slot* slot_;
    uint64_t streamed_ = 0;
};

class MemoryStream : public DcmOutputStream {
  public:
    explicit MemoryStream(MemoryConsumer* consumer) : DcmOutputStream(consumer) {}
};

bool MemoryConsumer::journal_write(uint64_t upto) {
    return journal->write_data(*slot_, streamed_, out_.data() + streamed_, upto - streamed_, true);
}

// The file meta information the Python spool and storescp write: preamble, DICM, group 0002 with its length.
bool append_meta(std::string& out, const T_DIMSE_C_StoreRQ& request, const char* transfer_syntax,
                 const std::string& calling_ae) {
    DcmMetaInfo meta;
    const Uint8 version[2] = {0, 1};
    OFCondition ok = meta.putAndInsertUint8Array(DCM_FileMetaInformationVersion, version, 2);
    if (ok.good()) ok = meta.putAndInsertString(DCM_MediaStorageSOPClassUID, request.AffectedSOPClassUID);
    if (ok.good()) ok = meta.putAndInsertString(DCM_MediaStorageSOPInstanceUID, request.AffectedSOPInstanceUID);
    if (ok.good()) ok = meta.putAndInsertString(DCM_TransferSyntaxUID, transfer_syntax);
    if (ok.good()) ok = meta.putAndInsertString(DCM_ImplementationClassUID, OFFIS_IMPLEMENTATION_CLASS_UID);
    if (ok.good()) ok = meta.putAndInsertString(DCM_ImplementationVersionName, OFFIS_DTK_IMPLEMENTATION_VERSION_NAME2);  // as DCMTK's bit-preserving receive writes it
    if (ok.good() && !calling_ae.empty())
        ok = meta.putAndInsertString(DCM_SourceApplicationEntityTitle, calling_ae.c_str());
    if (ok.good())
        ok = meta.computeGroupLengthAndPadding(EGL_withGL, EPD_noChange, EXS_LittleEndianExplicit, EET_ExplicitLength);
    if (ok.bad()) return false;
    MemoryConsumer consumer(out);
    MemoryStream stream(&consumer);
    meta.transferInit();
    ok = meta.write(stream, EXS_LittleEndianExplicit, EET_ExplicitLength, NULL);
    meta.transferEnd();
    stream.flush();
    return ok.good();
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
        std::string line = "END\t" + clean(calling_ae_) + "\t" + problem + "\t" + list;
        if (journal == NULL || !spool_writes_paused) emit_in_order(line);  // after its instances' STORED events
        calling_ae_.clear();
        studies_.clear();
    }

    OFCondition handleIncomingCommand(T_DIMSE_Message* message, const DcmPresentationContextInfo& info) override {
        if (message->CommandField == DIMSE_C_STORE_RQ)
            return handleStore(message->msg.CStoreRQ, info.presentationContextID);
        return DcmThreadSCP::handleIncomingCommand(message, info);
    }

  public:
    void setAssociation(T_ASC_Association* association) { association_ = association; }

  private:
    OFCondition handleStore(T_DIMSE_C_StoreRQ& request, T_ASC_PresentationContextID context) {
        if (journal != NULL) return handleJournalledStore(request, context);
        std::string incoming = policy.incoming + "/" + std::to_string(sequence.fetch_add(1)) + ".tmp";
        long long t0 = Profile::clock_ns();
        OFCondition received = receiveSTORERequest(request, context, incoming.c_str());
        if (received.bad()) {
            ::unlink(incoming.c_str());
            return received;
        }
        double received_at = now();
        long long t1 = Profile::clock_ns(), t2 = t1;
        Uint16 status = 0;
        std::string reason, final_path, header;
        if (disk_low()) {
            status = STATUS_OUT_OF_RESOURCES;
            reason = "spool disk below its watermark";
        } else {
            Checked checked = check(incoming, request);
            t2 = Profile::clock_ns();
            status = checked.status;
            reason = checked.reason;
            header = checked.header;
            if (status == 0) status = place(incoming, checked, request, final_path, reason);
        }
        long long t3 = Profile::clock_ns();
        if (status != 0) {
            ::unlink(incoming.c_str());
            refused_ = true;
        } else {
            studies_.insert(final_path.substr(policy.spool.size() + 1, final_path.find('/', policy.spool.size() + 1) - policy.spool.size() - 1));
        }
        OFCondition answered = sendSTOREResponse(context, request, status);
        if (status == 0) profile.add(t0, t1, t2, t3, Profile::clock_ns());
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

    // Received into memory and its journal slot, checked, committed to the journal (or, when it does not fit, its
    // own file fsynced), answered; then put in the spool (not synced: the journal holds it) and said STORED.
    OFCondition handleJournalledStore(T_DIMSE_C_StoreRQ& request, T_ASC_PresentationContextID context) {
        T_ASC_PresentationContext accepted;
        if (ASC_findAcceptedPresentationContext(association_->params, context, &accepted).bad())
            return DIMSE_BADDATA;
        std::string data;
        if (!append_meta(data, request, accepted.acceptedTransferSyntax, calling_ae_)) return DIMSE_BADDATA;
        // A slot as large as this association's largest instance yet and a quarter (it is shortened once the
        // instance is in); none when the journal is full.
        Slot slot;
        uint64_t estimate = largest_ ? largest_ + largest_ / 4 : FIRST_ESTIMATE;
        if (!journal->reserve(estimate, slot)) slot = Slot();
        data.reserve(std::max<uint64_t>(slot.capacity(), data.size() + (64 << 10)));
        MemoryConsumer consumer(data, slot.span ? &slot : NULL);
        MemoryStream stream(&consumer);
        T_ASC_PresentationContextID received_on = context;
        long long t0 = Profile::clock_ns();
        OFCondition received =
            DIMSE_receiveDataSetInFile(association_, DIMSE_NONBLOCKING, dimse_timeout, &received_on, &stream, NULL, NULL);
        if (received.good() && received_on != context)
            received = DIMSE_RECEIVEFAILED;  // the data set came on another presentation context
        if (received.bad()) {
            journal->abandon(slot);
            return received;
        }
        largest_ = std::max<uint64_t>(largest_, data.size());
        double received_at = now();
        long long t1 = Profile::clock_ns();
        Uint16 status = 0;
        std::string reason, final_path;
        Checked checked;
        if (disk_low()) {
            status = STATUS_OUT_OF_RESOURCES;
            reason = "spool disk below its watermark";
        } else {
            checked = check_bytes(data, request);
            status = checked.status;
            reason = checked.reason;
        }
        long long t2 = Profile::clock_ns();
        bool journalled = false;
        if (status == 0) {
            final_path = policy.spool + "/" + checked.study + "/" + checked.series + "/" +
                         trimmed(request.AffectedSOPInstanceUID) + ".dcm";
            if (!consumer.streaming()) {  // it outgrew its slot (or had none): a slot its size, written whole
                journal->abandon(slot);
                if (!journal->reserve(data.size(), slot)) slot = Slot();
            }
            if (slot.span != 0) {
                journal->shrink(slot, data.size());
                journalled = journal->commit(slot, consumer.streaming() ? consumer.streamed() : 0, received_at,
                                             final_path, calling_ae_, data);
                if (!journalled) journal->abandon(slot);
            }
            if (!journalled && !write_file(final_path, data.data(), data.size(), true)) {  // the direct path
                reason = std::string("spool write failed: ") + std::strerror(errno);
                status = errno == ENOSPC ? STATUS_OUT_OF_RESOURCES : STATUS_PROCESSING_FAILURE;
            }
        } else {
            journal->abandon(slot);
        }
        long long t3 = Profile::clock_ns();
        if (status != 0) {
            refused_ = true;
        } else {
            studies_.insert(checked.study);
        }
        OFCondition answered = sendSTOREResponse(context, request, status);
        if (status == 0) profile.add(t0, t1, t2, t3, Profile::clock_ns());
        if (status == 0) {
            char when[32];
            std::snprintf(when, sizeof when, "%.6f", received_at);
            std::string line = "STORED\t" + final_path + "\t" + clean(calling_ae_) + "\t" + when +
                               (checked.header.empty() ? "" : "\t") + checked.header;
            if (!journalled) {
                writer.line(line);  // in the spool, fsynced, already
            } else if (!spool_writes_paused) {
                SpoolWriter::Task task;
                task.seq = slot.seq;
                task.offset = slot.offset + SLOT_DATA;
                task.length = data.size();
                task.path = final_path;
                task.line = line;
                writer.push(std::move(task));
            }
        } else {
            char hex[8];
            std::snprintf(hex, sizeof hex, "%04X", status);
            writer.line(std::string("REFUSED\t") + hex + "\t" + clean(calling_ae_) + "\t" + clean(reason));
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

    T_ASC_Association* association_ = NULL;
    std::string calling_ae_;
    std::set<std::string> studies_;
    bool refused_ = false;
    bool aborted_ = false;
    uint64_t largest_ = 0;  // this association's largest instance yet (its next journal slot's size)
};

std::atomic<unsigned long> associations{0};

// One association on a thread of its own, with the shared configuration.
void serve(T_ASC_Association* association, DcmSharedSCPConfig config) {
    {
        GatewaySCP scp;
        scp.setSharedConfig(config);
        scp.setAssociation(association);
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
                 "       [--journal FILE [--journal-bytes N]] [--profile 1]\n"
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
    std::string journal_path;  // with a journal: fewer syncs per instance (see "The journal" above)
    unsigned long long journal_bytes = 128ull << 20;
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
        else if (arg == "--profile") profile.on = std::string(value) == "1";
        else if (arg == "--journal") journal_path = value;
        else if (arg == "--journal-bytes") journal_bytes = std::strtoull(value, NULL, 10);
        else return usage();
    }
    if (policy.spool.empty() || policy.incoming.empty() || port == 0 || port > 65535 || sop_classes.empty() ||
        transfer_syntaxes.empty())
        return usage();
    ::mkdir(policy.spool.c_str(), 0700);
    ::mkdir(policy.incoming.c_str(), 0700);
    dimse_timeout = static_cast<int>(dimse);
    crc_init();

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
        if (journal != NULL) {  // (within the gateway's 5 s) what was acknowledged goes to the spool now, not at the
            writer.drain(2);    // next start
            settler.drain(2);
        }
        profile.print();
        std::_Exit(0);
    });
    watch.detach();
    signal(SIGTERM, [](int) { std::_Exit(0); });
    signal(SIGPIPE, SIG_IGN);

    if (!journal_path.empty()) {  // listening already (a port in use ends the start before
        // anything is replayed): what the journal holds past its checkpoint goes to the spool before READY
        journal = new Journal();
        std::vector<Replayed> replayed;
        std::string error;
        if (!journal->open(journal_path, journal_bytes, error) || !journal->replay(replayed, error)) {
            std::fprintf(stderr, "gateway-storescp: journal %s: %s\n", journal_path.c_str(), error.c_str());
            return 1;
        }
        for (const Replayed& r : replayed) {
            char when[32];
            std::snprintf(when, sizeof when, "%.6f", r.received_at);
            emit("REPLAYED\t" + r.path + "\t" + clean(r.calling_ae) + "\t" + when);
        }
        settler.start();
        writer.start();
    }
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
