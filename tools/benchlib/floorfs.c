/* floorfs: the least a FUSE daemon can do for a page fault, in C.
 *
 * One file, "f", of SIZE bytes.  A READ is answered either from memory (a
 * constant buffer: the FUSE round trip alone) or by one O_DIRECT pread of
 * BACKING at the same offset (a serial fetch, as any lazy-memory daemon
 * must do: it learns which page is wanted only from the READ).  Single
 * threaded, libfuse's own loop, no checksum, no bookkeeping: no daemon that
 * fetches after the READ arrives can be faster on this machine.  Used by
 * tools/bench-fuse-floor to put memfs's 4 KiB fault beside that floor.
 *
 *   floorfs MNT SIZE [BACKING]     (foreground; unmount to stop)
 */
#define FUSE_USE_VERSION 34
#define _GNU_SOURCE
#include <fuse_lowlevel.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FILE_INO 2
#define MAX_READ (1 << 20)

static off_t size;
static int backing = -1;
static char *buf;

static void fill_attr(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0644;
        st->st_nlink = 1;
        st->st_size = size;
    }
}

static void floor_init(void *data, struct fuse_conn_info *conn)
{
    (void)data;
    conn->max_readahead = 0;   /* one READ per fault, as bench-fault asks memfs */
}

static void floor_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;
    if (parent != FUSE_ROOT_ID || strcmp(name, "f") != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof e);
    e.ino = FILE_INO;
    e.attr_timeout = e.entry_timeout = 3600.0;
    fill_attr(FILE_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void floor_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    if (ino != FUSE_ROOT_ID && ino != FILE_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_attr(ino, &st);
    fuse_reply_attr(req, &st, 3600.0);
}

static void floor_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != FILE_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

static void floor_read(fuse_req_t req, fuse_ino_t ino, size_t n, off_t off,
                       struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    if (off >= size) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if (n > MAX_READ)
        n = MAX_READ;
    if ((off_t)n > size - off)
        n = size - off;
    if (backing >= 0) {
        ssize_t got = pread(backing, buf, n, off);
        if (got != (ssize_t)n) {
            fuse_reply_err(req, got < 0 ? errno : EIO);
            return;
        }
    }
    fuse_reply_buf(req, buf, n);
}

static const struct fuse_lowlevel_ops ops = {
    .init = floor_init,
    .lookup = floor_lookup,
    .getattr = floor_getattr,
    .open = floor_open,
    .read = floor_read,
};

int main(int argc, char **argv)
{
    char *fargv[] = {argv[0], NULL};
    struct fuse_args args = FUSE_ARGS_INIT(1, fargv);
    struct fuse_session *se;
    int rc;

    if (argc < 3) {
        fprintf(stderr, "usage: floorfs MNT SIZE [BACKING]\n");
        return 2;
    }
    size = strtoll(argv[2], NULL, 0);
    if (argc > 3 && (backing = open(argv[3], O_RDONLY | O_DIRECT)) < 0) {
        perror(argv[3]);
        return 1;
    }
    if (posix_memalign((void **)&buf, 4096, MAX_READ) != 0)
        return 1;
    memset(buf, 0xa5, MAX_READ);
    se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    if (se == NULL || fuse_session_mount(se, argv[1]) != 0)
        return 1;
    rc = fuse_session_loop(se);
    fuse_session_unmount(se);
    fuse_session_destroy(se);
    return rc ? 1 : 0;
}
