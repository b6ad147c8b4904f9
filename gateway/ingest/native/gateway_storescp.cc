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
    std::atomic<long long> instances{0}, receive_ns{0}, check_ns{0}, durable_ns{0}, respond_ns{0};

    static long long clock_ns() {
        return std::chrono::duration_cast<std::chrono::nanoseconds>(
                   std::chrono::steady_clock::now().time_since_epoch())
            .count();
    }

    // The four phases of one instance, from five clock readings.
    void add(long long t0, long long t1, long long t2, long long t3, long long t4) {
        if (!on) return;
        instances++;
        receive_ns += t1 - t0;
        check_ns += t2 - t1;
        durable_ns += t3 - t2;
        respond_ns += t4 - t3;
    }

    void print() const {
        long long n = instances.load();
        if (!on || n == 0) return;
        std::fprintf(stderr, "PROFILE\tinstances=%lld\treceive_ms=%.3f\tcheck_ms=%.3f\tdurable_ms=%.3f\trespond_ms=%.3f\n",
                     n, receive_ns / 1e6 / n, check_ns / 1e6 / n, durable_ns / 1e6 / n, respond_ns / 1e6 / n);
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
// With a journal, a C-STORE's data set is received into memory (bit-preserving, behind a file meta header built
// from the request), checked, appended to a pre-written journal file with one pwrite, and the journal is
// fdatasync'ed (several associations share one fdatasync: group commit) - only then is the response sent. A writer
// thread then writes the instance to <spool>/<study>/<series>/<sop>.dcm (temporary name, rename), emits STORED,
// and every batch syncs the file system (syncfs) and advances the journal's checkpoint, after which the space is
// reused. At start, records past the checkpoint are written to the spool again and reported (REPLAYED) before
// READY: an instance acknowledged before a crash is in the spool after it, whatever the writer had done.
//
// Layout: a 4 KiB header (magic, checkpoint sequence, offset of the next record), then records, each 4 KiB
// aligned: a 64-byte record header (magic, sequence, lengths, received time, CRC-32C of the rest and of the
// header itself), the spool path, the calling AE title, the file's bytes. A record is accepted at replay only with
// the expected sequence and both CRCs right; a record torn by a crash was never acknowledged (its fdatasync had
// not returned), and an acknowledged record is never behind a torn one (a record is acknowledged only once every
// earlier one is durable too). An instance that does not fit (the writer is behind, or it is larger than a quarter
// of the journal) takes the direct path: its own file fsynced, renamed, folder fsynced.

const char JOURNAL_MAGIC[8] = {'G', 'W', 'J', 'R', 'N', 'L', '0', '1'};
const char RECORD_MAGIC[8] = {'G', 'W', 'R', 'E', 'C', 'O', 'R', 'D'};
const uint64_t JOURNAL_HEADER = 4096, RECORD_ALIGN = 4096;

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

struct RecordHeader {  // 64 bytes on disk, little-endian host order (the journal never leaves this machine)
    char magic[8];
    uint64_t seq;
    uint64_t data_length;
    uint32_t path_length;
    uint32_t calling_length;
    double received_at;
    uint32_t body_crc;  // of path, calling AE and data
    uint32_t header_crc;  // of the 60 bytes before it (with this field zero)
    char reserved[16];
};
static_assert(sizeof(RecordHeader) == 64, "record header is 64 bytes");

struct JournalHeader {
    char magic[8];
    uint64_t checkpoint_seq;  // every record up to this one is in the spool, durably
    uint64_t next_offset;     // where the record after it starts (or, if it is not there, the journal's start)
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

class Journal {
  public:
    bool open(const std::string& path, uint64_t bytes, std::string& error) {
        size_ = bytes / RECORD_ALIGN * RECORD_ALIGN;
        fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd_ < 0) return fail(error, "cannot open the journal");
        struct stat st;
        if (::fstat(fd_, &st) != 0) return fail(error, "cannot stat the journal");
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

    // Records past the checkpoint, in order, each with its bytes written to the spool (temporary name, rename).
    bool replay(std::vector<Replayed>& out, std::string& error) {
        JournalHeader header;
        std::memset(&header, 0, sizeof header);
        uint64_t seq = 0, offset = JOURNAL_HEADER;
        if (read_all(fd_, &header, sizeof header, 0) && std::memcmp(header.magic, JOURNAL_MAGIC, 8) == 0 &&
            header.crc == crc32c(0, &header, offsetof(JournalHeader, crc))) {
            seq = header.checkpoint_seq;
            offset = header.next_offset;
        }
        std::string body;
        for (;;) {
            RecordHeader record;
            uint64_t at = offset;
            if (!record_at(at, seq + 1, record) && !(at = JOURNAL_HEADER, record_at(at, seq + 1, record))) break;
            body.resize(record.path_length + record.calling_length + record.data_length);
            if (!read_all(fd_, &body[0], body.size(), at + sizeof record) ||
                crc32c(0, body.data(), body.size()) != record.body_crc)
                break;  // torn by a crash before its fdatasync returned: never acknowledged
            std::string path = body.substr(0, record.path_length);
            std::string calling = body.substr(record.path_length, record.calling_length);
            if (!spool_path_ok(path) || !write_instance(path, body.data() + record.path_length + record.calling_length,
                                                        record.data_length)) {
                error = "cannot write a journalled instance to " + path + ": " + std::strerror(errno);
                return false;
            }
            out.push_back(Replayed{path, calling, record.received_at});
            seq = record.seq;
            offset = at + aligned(sizeof record + body.size());
        }
        if (!out.empty() && ::syncfs(fd_) != 0) return fail(error, "syncfs failed");
        next_seq_ = seq + 1;
        written_upto_ = durable_ = seq;  // the sequence goes on from here
        return checkpoint_to(seq, JOURNAL_HEADER, error);
    }

    // Room for a record of `length` bytes: its sequence and offset; false when the journal is full (or broken).
    bool reserve(uint64_t length, uint64_t& seq, uint64_t& offset) {
        uint64_t need = aligned(length);
        std::lock_guard<std::mutex> guard(lock_);
        if (broken_ || need > size_ / 4) return false;
        uint64_t start = live_.empty() ? JOURNAL_HEADER : head_;
        if (!live_.empty()) {
            uint64_t oldest = live_.front().offset;
            if (start >= oldest) {  // not wrapped: to the end, else from the start up to the oldest record
                if (start + need > size_) {
                    if (JOURNAL_HEADER + need > oldest) return false;
                    start = JOURNAL_HEADER;
                }
            } else if (start + need > oldest) {
                return false;
            }
        }
        seq = next_seq_++;
        offset = start;
        head_ = start + need;
        live_.push_back(Live{seq, start, false});
        return true;
    }

    // Write the record; true once it and every record before it are durable (then the instance may be
    // acknowledged). False: the journal failed (the caller takes the direct path).
    bool commit(uint64_t seq, uint64_t offset, const RecordHeader& header, const std::string& path,
                const std::string& calling, const std::string& data) {
        std::vector<char> head(sizeof header + path.size() + calling.size());
        std::memcpy(head.data(), &header, sizeof header);
        std::memcpy(head.data() + sizeof header, path.data(), path.size());
        std::memcpy(head.data() + sizeof header + path.size(), calling.data(), calling.size());
        bool ok = write_all(fd_, head.data(), head.size(), offset) &&
                  write_all(fd_, data.data(), data.size(), offset + head.size());
        std::unique_lock<std::mutex> guard(lock_);
        if (!ok) broken_ = true;
        written_.insert(seq);
        while (written_.count(written_upto_ + 1)) written_.erase(++written_upto_);
        while (!broken_ && durable_ < seq) {
            if (syncing_) {
                synced_.wait(guard);
                continue;
            }
            syncing_ = true;
            uint64_t target = written_upto_;
            guard.unlock();
            bool synced = ::fdatasync(fd_) == 0;
            guard.lock();
            syncing_ = false;
            if (synced) durable_ = std::max(durable_, target);
            else broken_ = true;
            synced_.notify_all();
            if (target < seq && durable_ < seq) synced_.wait_for(guard, std::chrono::milliseconds(1));
        }
        return !broken_;
    }

    // The writer wrote these records' instances and synced the file system: move the checkpoint past every
    // record up to the first one not retired yet, then free their space.
    void retire(const std::vector<uint64_t>& seqs) {
        std::unique_lock<std::mutex> guard(lock_);
        for (uint64_t seq : seqs)
            for (Live& live : live_)
                if (live.seq == seq) live.retired = true;
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

    bool record_at(uint64_t offset, uint64_t seq, RecordHeader& record) {
        if (offset + sizeof record > size_ || !read_all(fd_, &record, sizeof record, offset)) return false;
        if (std::memcmp(record.magic, RECORD_MAGIC, 8) != 0 || record.seq != seq) return false;
        if (record.header_crc != crc32c(0, &record, offsetof(RecordHeader, header_crc))) return false;
        uint64_t body = record.path_length + record.calling_length + record.data_length;
        return record.path_length < 4096 && record.calling_length <= 64 && offset + sizeof record + body <= size_;
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
    std::condition_variable synced_;
    uint64_t next_seq_ = 1, head_ = JOURNAL_HEADER;
    std::deque<Live> live_;
    std::set<uint64_t> written_;
    uint64_t written_upto_ = 0, durable_ = 0;
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

// An instance's bytes to its spool path under a temporary name, then renamed: a reader never sees half a file.
bool write_file(const std::string& path, const char* data, uint64_t length, bool sync) {
    if (!make_folders(path, sync)) return false;
    size_t slash = path.rfind('/');
    // Hidden and ending in .tmp, as the Python spool names its own: its start-up removes a crash's leftover.
    std::string temporary = path.substr(0, slash + 1) + "." + path.substr(slash + 1) + ".tmp";
    int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return false;
    bool ok = write_all(fd, data, length, 0) && (!sync || ::fsync(fd) == 0);
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

// What the writer thread does after an acknowledgement, in the order the acknowledgements were sent.
struct Pending {
    enum Kind { STORE, END } kind = STORE;
    uint64_t seq = 0;   // 0: already in the spool (the direct path); only the event is left to emit
    std::string path;   // the spool path (STORE)
    std::string data;   // the file's bytes (journalled STORE)
    std::string line;   // the event to emit once the file is in place
};

class Writer {
  public:
    // Written instances are synced (one syncfs) and their journal space freed this often, or once they fill a
    // quarter of the journal: seldom enough that the batch syncs do not slow the acknowledgements' fdatasync.
    static const int SETTLE_MS = 1000;

    void start() { std::thread([this] { run(); }).detach(); }

    // Until everything queued is in the spool and synced (a clean stop), or `seconds` passed.
    void drain(int seconds) {
        std::unique_lock<std::mutex> guard(lock_);
        draining_ = true;
        ready_.notify_all();
        idle_.wait_for(guard, std::chrono::seconds(seconds), [this] { return queue_.empty() && settled_; });
    }

    void push(Pending&& item) {
        {
            std::lock_guard<std::mutex> guard(lock_);
            queue_.push_back(std::move(item));
        }
        ready_.notify_one();
    }

  private:
    void run() {
        // Fault injection for the crash tests: a writer that never writes (only the journal holds what was
        // acknowledged).
        const bool paused = std::getenv("GATEWAY_STORESCP_PAUSE_WRITER") != NULL;
        std::vector<uint64_t> written;  // instances in place, not yet synced
        uint64_t written_bytes = 0;
        std::chrono::steady_clock::time_point first_written;
        for (;;) {
            Pending item;
            {
                std::unique_lock<std::mutex> guard(lock_);
                if (queue_.empty() || paused) {
                    settled_ = written.empty();
                    if (settled_) {
                        idle_.notify_all();
                        ready_.wait(guard);
                        continue;
                    }
                    auto due = first_written + std::chrono::milliseconds(SETTLE_MS);
                    if (!draining_ && std::chrono::steady_clock::now() < due) {
                        ready_.wait_until(guard, due);
                        continue;
                    }
                    guard.unlock();
                    settle(written);
                    written_bytes = 0;
                    continue;
                }
                item = std::move(queue_.front());
                queue_.pop_front();
                settled_ = false;
            }
            if (item.kind == Pending::STORE && item.seq != 0) {
                if (!write_file(item.path, item.data.data(), item.data.size(), false)) {
                    // The journal still holds it; the next start writes it. Said, and the event withheld.
                    std::fprintf(stderr, "gateway-storescp: cannot write %s: %s\n", item.path.c_str(),
                                 std::strerror(errno));
                    continue;
                }
                if (written.empty()) first_written = std::chrono::steady_clock::now();
                written.push_back(item.seq);
            }
            emit(item.line);
            if ((written_bytes += item.data.size()) >= journal->capacity() / 4) {
                settle(written);
                written_bytes = 0;
            }
        }
    }

    // Make the written instances durable (one syncfs for the batch) and let the journal reuse their space.
    void settle(std::vector<uint64_t>& written) {
        if (::syncfs(journal->fd()) != 0) {
            std::fprintf(stderr, "gateway-storescp: syncfs failed: %s\n", std::strerror(errno));
            written.clear();  // the journal keeps them; the next start writes them again
            return;
        }
        journal->retire(written);
        written.clear();
    }

    std::mutex lock_;
    std::condition_variable ready_, idle_;
    std::deque<Pending> queue_;
    bool draining_ = false, settled_ = true;
};

Writer writer;

// Receives a data set into memory, exactly as sent, behind the file meta header the file will have.
class MemoryConsumer : public DcmConsumer {
  public:
    explicit MemoryConsumer(std::string& out) : out_(out) {}
    OFBool good() const override { return OFTrue; }
    OFCondition status() const override { return EC_Normal; }
    OFBool isFlushed() const override { return OFTrue; }
    offile_off_t avail() const override { return 1 << 30; }
    offile_off_t write(const void* buf, offile_off_t buflen) override {
        out_.append(static_cast<const char*>(buf), static_cast<size_t>(buflen));
        return buflen;
    }
    void flush() override {}

  private:
    std::string& out_;
};

class MemoryStream : public DcmOutputStream {
  public:
    explicit MemoryStream(MemoryConsumer* consumer) : DcmOutputStream(consumer) {}
};

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
        if (journal != NULL) {  // after the STORED events of its instances, which the writer emits
            Pending end;
            end.kind = Pending::END;
            end.line = line;
            writer.push(std::move(end));
        } else {
            emit(line);
        }
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

    // Received into memory, checked, journalled (or, when it does not fit, its own file fsynced), answered; the
    // writer puts it in the spool and says STORED.
    OFCondition handleJournalledStore(T_DIMSE_C_StoreRQ& request, T_ASC_PresentationContextID context) {
        T_ASC_PresentationContext accepted;
        if (ASC_findAcceptedPresentationContext(association_->params, context, &accepted).bad())
            return DIMSE_BADDATA;
        std::string data;
        if (!append_meta(data, request, accepted.acceptedTransferSyntax, calling_ae_)) return DIMSE_BADDATA;
        MemoryConsumer consumer(data);
        MemoryStream stream(&consumer);
        T_ASC_PresentationContextID received_on = context;
        long long t0 = Profile::clock_ns();
        OFCondition received =
            DIMSE_receiveDataSetInFile(association_, DIMSE_NONBLOCKING, dimse_timeout, &received_on, &stream, NULL, NULL);
        if (received.bad()) return received;
        if (received_on != context) return DIMSE_RECEIVEFAILED;  // the data set came on another presentation context
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
        Pending item;
        if (status == 0) {
            final_path = policy.spool + "/" + checked.study + "/" + checked.series + "/" +
                         trimmed(request.AffectedSOPInstanceUID) + ".dcm";
            RecordHeader header;
            std::memset(&header, 0, sizeof header);
            std::memcpy(header.magic, RECORD_MAGIC, 8);
            header.data_length = data.size();
            header.path_length = static_cast<uint32_t>(final_path.size());
            header.calling_length = static_cast<uint32_t>(calling_ae_.size());
            header.received_at = received_at;
            uint32_t crc = crc32c(0, final_path.data(), final_path.size());
            crc = crc32c(crc, calling_ae_.data(), calling_ae_.size());
            header.body_crc = crc32c(crc, data.data(), data.size());
            uint64_t seq = 0, offset = 0;
            bool journalled = false;
            if (journal->reserve(sizeof header + final_path.size() + calling_ae_.size() + data.size(), seq, offset)) {
                header.seq = seq;
                header.header_crc = crc32c(0, &header, offsetof(RecordHeader, header_crc));
                journalled = journal->commit(seq, offset, header, final_path, calling_ae_, data);
            }
            if (journalled) {
                item.seq = seq;
                item.data = std::move(data);
            } else if (!write_file(final_path, data.data(), data.size(), true)) {  // the direct path
                reason = std::string("spool write failed: ") + std::strerror(errno);
                status = errno == ENOSPC ? STATUS_OUT_OF_RESOURCES : STATUS_PROCESSING_FAILURE;
            }
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
            item.path = final_path;
            item.line = "STORED\t" + final_path + "\t" + clean(calling_ae_) + "\t" + when +
                        (checked.header.empty() ? "" : "\t") + checked.header;
            writer.push(std::move(item));
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

    T_ASC_Association* association_ = NULL;
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
        if (journal != NULL) writer.drain(4);  // (within the gateway's 5 s) what was acknowledged goes to the spool now, not at the next start
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
