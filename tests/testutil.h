/* testutil.h — helpers shared by the Check suites: temporary directories and
 * random models made by this build's mkad-genmodel. */
#ifndef MKAD_TESTUTIL_H
#define MKAD_TESTUTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Directory for test artefacts: $top_builddir/tests/tmp (made on demand). */
static inline const char *tu_tmpdir(void)
{
    static char dir[2048];
    if (!dir[0]) {
        const char *b = getenv("top_builddir");
        snprintf(dir, sizeof dir, "%.2000s/tests/tmp", b ? b : ".");
        char cmd[2100];
        snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
        if (system(cmd) != 0) abort();
    }
    return dir;
}

/* Runs `mkad-genmodel --out <tmp>/<name> <args>` unless that model exists
 * already; writes the directory to out. Returns 0 on success. */
static inline int tu_genmodel(const char *name, const char *args, char *out, size_t outlen)
{
    const char *b = getenv("top_builddir");
    snprintf(out, outlen, "%s/%s", tu_tmpdir(), name);
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "rm -rf '%.4000s' && '%.2000s/mkad-genmodel' --out '%.4000s' %.4000s >/dev/null",
             out, b ? b : ".", out, args);
    return system(cmd) == 0 ? 0 : -1;
}

/* Writes len bytes to dir/name. Returns 0 on success. */
static inline int tu_write_file(const char *dir, const char *name, const void *data, size_t len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(data, 1, len, f);
    return (fclose(f) == 0 && w == len) ? 0 : -1;
}

#endif
