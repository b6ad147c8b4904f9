/* The cost of the write patterns a durable receiver can use, per instance, on the spool's file system.
 *
 *   cc -O2 -o build/fsync_patterns benchmarks/fsync_patterns.c
 *   build/fsync_patterns <folder on the spool's file system> [instances=200] [KiB per instance=520]
 *
 * Prints ms per instance for: a new file + fsync + rename + folder fsync (what the native receiver does before
 * each acknowledgement); a new file without any sync (what storescp does); a pre-written (zero-filled) journal
 * overwritten in place + fdatasync (the native receiver's journal); a fallocate'd journal + fdatasync; a growing
 * append + fdatasync. The ingest benchmark runs it on the spool's disk (`make bench-report`: the floor under each
 * receive path, in benchmarks/README.md).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void report(const char *what, double started, int n) {
    printf("%-48s %.3f ms per instance\n", what, (now() - started) * 1000.0 / n);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FOLDER [instances] [KiB per instance]\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    int n = argc > 2 ? atoi(argv[2]) : 200;
    size_t size = (size_t)(argc > 3 ? atoi(argv[3]) : 520) * 1024;
    char *data = malloc(size), path[4096], target[4096];
    memset(data, 7, size);

    snprintf(path, sizeof path, "%s/files", dir);
    mkdir(path, 0700);
    int folder = open(path, O_RDONLY | O_DIRECTORY);
    double started = now();
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/files/%d.tmp", dir, i);
        snprintf(target, sizeof target, "%s/files/%d.dcm", dir, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (write(fd, data, size) != (ssize_t)size) return 1;
        fsync(fd);
        close(fd);
        rename(path, target);
        fsync(folder);
    }
    report("new file + fsync + rename + folder fsync", started, n);

    started = now();
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/files/plain-%d.dcm", dir, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (write(fd, data, size) != (ssize_t)size) return 1;
        close(fd);
    }
    report("new file, no sync", started, n);

    snprintf(path, sizeof path, "%s/journal-prewritten", dir);
    int journal = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    for (int i = 0; i < n; i++)
        if (write(journal, data, size) != (ssize_t)size) return 1;
    fsync(journal);
    started = now();
    for (int i = 0; i < n; i++) {
        if (pwrite(journal, data, size, (off_t)i * size) != (ssize_t)size) return 1;
        fdatasync(journal);
    }
    report("pre-written journal, overwrite + fdatasync", started, n);

    snprintf(path, sizeof path, "%s/journal-fallocated", dir);
    int allocated = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    fallocate(allocated, 0, 0, (off_t)n * size);
    fsync(allocated);
    started = now();
    for (int i = 0; i < n; i++) {
        if (pwrite(allocated, data, size, (off_t)i * size) != (ssize_t)size) return 1;
        fdatasync(allocated);
    }
    report("fallocate'd journal, write + fdatasync", started, n);

    snprintf(path, sizeof path, "%s/journal-growing", dir);
    int growing = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600);
    started = now();
    for (int i = 0; i < n; i++) {
        if (write(growing, data, size) != (ssize_t)size) return 1;
        fdatasync(growing);
    }
    report("growing journal, append + fdatasync", started, n);
    return 0;
}
