/* memfs._fast: file disk reads without a thread hand-off.
 *
 * A cold 4 KiB read through trio.to_thread costs a thread wake-up and a GIL
 * hand-off (hundreds of µs on a loaded two-core host, tools/bench-fault)
 * for a disk read of ~50 µs.  Linux native AIO on an O_DIRECT descriptor
 * reads asynchronously in the kernel; completions are signalled on an
 * eventfd that the trio loop polls like any other fd.  io_submit of a large
 * read runs in a thread of this module (no Python in it): on ext4, an
 * O_DIRECT read over a volume whose zero pages are holes builds a bio per
 * extent inside io_submit, 1.8-3 ms for a 4 MiB read (measured), which the
 * trio loop must not wait for; small reads are submitted inline.
 *
 *   ctx = AIO(depth)          io_setup + a non-blocking eventfd (ctx.fd)
 *   ctx.submit(fd, buf, offset, key)
 *                             one read of len(buf) bytes at offset into buf
 *                             (a writable buffer, aligned as O_DIRECT wants:
 *                             an anonymous mmap); buf is held until reaped
 *   ctx.reap(clear=True) -> [(key, result)]
 *                             completed reads (result: bytes read, or -errno);
 *                             clears the eventfd (with clear)
 *   ctx.close()
 *
 * Only raw syscalls: no libaio needed at build or run time.
 *
 *   scatter(dst, first, page_size, {page: data})
 *                             copy fetched pages into a READ's buffer
 *   Buffer(length)            page-aligned memory for O_DIRECT reads, taken
 *                             from (and given back to) a small pool of
 *                             memory already faulted in
 *   verify(data, page_size, sums, pages, good) -> [bad pages]
 *                             xxh3 of a run's pages against the page map
 *   span(pages, first, count, page_size) -> memoryview | None
 *                             the fetched pages as one view, if they lie in
 *                             order in one buffer
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    PyObject *key;
    Py_buffer view;
    struct iocb cb;
    int used;
} Slot;

typedef struct {
    PyObject_HEAD
    aio_context_t ctx;
    int efd;
    int depth;
    int inflight; /* queued or in the kernel, not reaped */
    Slot *slots;
    int *free_list;
    int nfree;
    /* the submitter thread and what it shares with the loop (under mu) */
    pthread_t thread;
    int started, stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int *queue; /* slots to submit: a ring of depth */
    int qhead, qlen;
    int *failed; /* slots whose io_submit failed, with their -errno */
    long *failed_res;
    int nfailed;
} AIOObject;

/* Reads up to this many bytes are submitted on the caller's thread: a
 * small read's submit is short, and the hop to the submitter thread cost a
 * 4 KiB fault more than it saved (figure 1 of tools/bench, measured). */
#define AIO_INLINE (128 << 10)

/* Submits the queued reads, in order, a batch per io_submit; a read the
 * kernel refuses completes at once with -errno (the eventfd says so). */
static void *
aio_submitter(void *arg)
{
    AIOObject *self = arg;
    struct iocb *cbs[64];
    int idx[64];
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the loop's */
    pthread_mutex_lock(&self->mu);
    for (;;) {
        while (!self->qlen && !self->stop)
            pthread_cond_wait(&self->cv, &self->mu);
        if (self->stop)
            break;
        int n = 0;
        while (self->qlen && n < 64) {
            idx[n] = self->queue[self->qhead];
            cbs[n] = &self->slots[idx[n]].cb;
            self->qhead = (self->qhead + 1) % self->depth;
            self->qlen--;
            n++;
        }
        pthread_mutex_unlock(&self->mu);
        for (int done = 0; done < n;) {
            long r = syscall(SYS_io_submit, self->ctx, (long)(n - done), cbs + done);
            if (r > 0) {
                done += (int)r;
                continue;
            }
            int err = r < 0 ? errno : EIO;
            if (err == EINTR)
                continue;
            uint64_t one = 1;
            pthread_mutex_lock(&self->mu);
            self->failed[self->nfailed] = idx[done];
            self->failed_res[self->nfailed++] = -err;
            pthread_mutex_unlock(&self->mu);
            if (write(self->efd, &one, sizeof one) < 0) { /* the next reap finds it */ }
            done++;
        }
        pthread_mutex_lock(&self->mu);
    }
    pthread_mutex_unlock(&self->mu);
    return NULL;
}

static PyObject *
aio_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    AIOObject *self = (AIOObject *)type->tp_alloc(type, 0);
    if (self)
        self->efd = -1;
    return (PyObject *)self;
}

static int
aio_init(AIOObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"depth", NULL};
    int depth = 128;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|i", kwlist, &depth))
        return -1;
    if (self->ctx) {
        PyErr_SetString(PyExc_ValueError, "AIO already initialised");
        return -1;
    }
    if (depth < 1 || depth > 65536) {
        PyErr_SetString(PyExc_ValueError, "depth must be 1..65536");
        return -1;
    }
    if (syscall(SYS_io_setup, depth, &self->ctx) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        syscall(SYS_io_destroy, self->ctx);
        self->ctx = 0;
        return -1;
    }
    self->depth = depth;
    self->slots = PyMem_Calloc(depth, sizeof(Slot));
    self->free_list = PyMem_Calloc(depth, sizeof(int));
    self->queue = PyMem_Calloc(depth, sizeof(int));
    self->failed = PyMem_Calloc(depth, sizeof(int));
    self->failed_res = PyMem_Calloc(depth, sizeof(long));
    if (!self->slots || !self->free_list || !self->queue || !self->failed ||
            !self->failed_res) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < depth; i++)
        self->free_list[i] = depth - 1 - i;
    self->nfree = depth;
    pthread_mutex_init(&self->mu, NULL);
    pthread_cond_init(&self->cv, NULL);
    int err = pthread_create(&self->thread, NULL, aio_submitter, self);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->started = 1;
    return 0;
}

static void
release_slot(AIOObject *self, int i)
{
    Slot *s = &self->slots[i];
    if (!s->used)
        return;
    PyBuffer_Release(&s->view);
    Py_CLEAR(s->key);
    s->used = 0;
    self->free_list[self->nfree++] = i;
}

static PyObject *
aio_close(AIOObject *self, PyObject *unused)
{
    if (self->started) { /* reads it took are submitted; the queued ones never are */
        pthread_mutex_lock(&self->mu);
        self->stop = 1;
        pthread_cond_signal(&self->cv);
        pthread_mutex_unlock(&self->mu);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(self->thread, NULL);
        Py_END_ALLOW_THREADS
        self->started = 0;
        self->qlen = self->nfailed = 0;
    }
    if (self->ctx) {
        /* io_destroy waits for the reads in flight: their buffers are still ours */
        syscall(SYS_io_destroy, self->ctx);
        self->ctx = 0;
    }
    if (self->slots)
        for (int i = 0; i < self->depth; i++)
            release_slot(self, i);
    self->inflight = 0;
    if (self->efd >= 0) {
        close(self->efd);
        self->efd = -1;
    }
    Py_RETURN_NONE;
}

static void
aio_dealloc(AIOObject *self)
{
    PyObject *r = aio_close(self, NULL);
    Py_XDECREF(r);
    PyMem_Free(self->slots);
    PyMem_Free(self->free_list);
    PyMem_Free(self->queue);
    PyMem_Free(self->failed);
    PyMem_Free(self->failed_res);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
aio_submit(AIOObject *self, PyObject *args)
{
    int fd;
    PyObject *buf, *key;
    long long offset;
    if (!PyArg_ParseTuple(args, "iOLO", &fd, &buf, &offset, &key))
        return NULL;
    if (!self->ctx) {
        PyErr_SetString(PyExc_ValueError, "AIO context is closed");
        return NULL;
    }
    if (!self->nfree) {
        PyErr_SetString(PyExc_BlockingIOError, "AIO context full");
        return NULL;
    }
    int i = self->free_list[self->nfree - 1];
    Slot *s = &self->slots[i];
    if (PyObject_GetBuffer(buf, &s->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    struct iocb *cb = &s->cb;
    memset(cb, 0, sizeof *cb);
    cb->aio_data = (uint64_t)i;
    cb->aio_lio_opcode = IOCB_CMD_PREAD;
    cb->aio_fildes = fd;
    cb->aio_buf = (uint64_t)(uintptr_t)s->view.buf;
    cb->aio_nbytes = (uint64_t)s->view.len;
    cb->aio_offset = offset;
    cb->aio_flags = IOCB_FLAG_RESFD;
    cb->aio_resfd = self->efd;
    /* The GIL is not let go here (a worker thread that took it meanwhile
     * could keep the loop waiting for up to the switch interval, 5 ms). */
    if (s->view.len <= AIO_INLINE) { /* small: submitted here, no thread hop */
        struct iocb *cbs[1] = {cb};
        long r;
        do
            r = syscall(SYS_io_submit, self->ctx, 1L, cbs);
        while (r < 0 && errno == EINTR);
        if (r != 1) { /* completes at once with -errno, as in the thread */
            uint64_t one = 1;
            pthread_mutex_lock(&self->mu);
            self->failed[self->nfailed] = i;
            self->failed_res[self->nfailed++] = r < 0 ? -errno : -EIO;
            pthread_mutex_unlock(&self->mu);
            if (write(self->efd, &one, sizeof one) < 0) { /* the next reap finds it */ }
        }
    } else { /* queued for the submitter thread */
        pthread_mutex_lock(&self->mu);
        self->queue[(self->qhead + self->qlen) % self->depth] = i;
        self->qlen++;
        pthread_cond_signal(&self->cv);
        pthread_mutex_unlock(&self->mu);
    }
    Py_INCREF(key);
    s->key = key;
    s->used = 1;
    self->nfree--;
    self->inflight++;
    Py_RETURN_NONE;
}

static PyObject *
aio_reap(AIOObject *self, PyObject *args)
{
    uint64_t n;
    int clear = 1;
    if (!PyArg_ParseTuple(args, "|p", &clear))
        return NULL;
    if (clear && self->efd >= 0 && read(self->efd, &n, sizeof n) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    int failed[64];
    long failed_res[64];
    int nfailed = 0;
    if (self->started) {
        pthread_mutex_lock(&self->mu);
        while (self->nfailed && nfailed < 64) {
            self->nfailed--;
            failed[nfailed] = self->failed[self->nfailed];
            failed_res[nfailed++] = self->failed_res[self->nfailed];
        }
        pthread_mutex_unlock(&self->mu);
    }
    for (int j = 0; j < nfailed; j++) {
        PyObject *item = Py_BuildValue("(Ol)", self->slots[failed[j]].key, failed_res[j]);
        release_slot(self, failed[j]);
        self->inflight--;
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    struct io_event ev[64];
    struct timespec zero = {0, 0};
    while (self->ctx && self->inflight) {
        long got = syscall(SYS_io_getevents, self->ctx, 0, 64, ev, &zero);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            Py_DECREF(out);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (got == 0)
            break;
        for (long j = 0; j < got; j++) {
            int i = (int)ev[j].data;
            Slot *s = &self->slots[i];
            PyObject *item = Py_BuildValue("(OL)", s->key, (long long)ev[j].res);
            release_slot(self, i);
            self->inflight--;
            if (!item || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
    }
    return out;
}

static PyObject *
aio_get_fd(AIOObject *self, void *closure)
{
    return PyLong_FromLong(self->efd);
}

static PyObject *
aio_get_inflight(AIOObject *self, void *closure)
{
    return PyLong_FromLong(self->inflight);
}

/* scatter(dst, first, page_size, pages): for every (page, data) of the dict
 * pages, copy data (a buffer of page_size bytes) to dst at
 * (page - first) * page_size.  One call instead of a Python slice
 * assignment per page (the fetched pages of a READ, or a push's held
 * pages); everything is checked before the first byte is copied. */
static PyObject *
fast_scatter(PyObject *module, PyObject *args)
{
    Py_buffer dst;
    long long first, ps;
    PyObject *pages;
    if (!PyArg_ParseTuple(args, "w*LLO!", &dst, &first, &ps, &PyDict_Type, &pages))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = PyDict_Size(pages), pos = 0, i = 0;
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    long long *at = PyMem_Calloc(n ? n : 1, sizeof(long long));
    PyObject *key, *val;
    if (!views || !at) {
        PyErr_NoMemory();
        goto out;
    }
    if (ps <= 0) {
        PyErr_SetString(PyExc_ValueError, "page_size must be positive");
        goto out;
    }
    while (PyDict_Next(pages, &pos, &key, &val)) {
        long long p = PyLong_AsLongLong(key);
        if (p == -1 && PyErr_Occurred())
            goto out;
        if (PyObject_GetBuffer(val, &views[i], PyBUF_SIMPLE) < 0)
            goto out;
        i++;
        at[i - 1] = (p - first) * ps;
        if (p < first || views[i - 1].len != ps || at[i - 1] + ps > dst.len) {
            PyErr_Format(PyExc_ValueError, "page %lld (%zd bytes) does not fit", p,
                         views[i - 1].len);
            goto out;
        }
    }
    for (Py_ssize_t j = 0; j < i; j++)
        memcpy((char *)dst.buf + at[j], views[j].buf, (size_t)ps);
    ret = Py_None;
    Py_INCREF(ret);
out:
    for (Py_ssize_t j = 0; j < i; j++)
        PyBuffer_Release(&views[j]);
    PyMem_Free(views);
    PyMem_Free(at);
    PyBuffer_Release(&dst);
    return ret;
}

/* ---- Buffer: O_DIRECT read buffers faulted in once ----------------------
 *
 * io_submit pins a read's buffer, and a fresh anonymous mapping is faulted
 * in (allocated, zeroed) right there: a 1 MiB read's submit took ~540 µs
 * into fresh memory and 45-75 µs into memory already faulted in (/var/tmp
 * on ext4, virtio disk, measured).  A Buffer's memory goes back to a small
 * pool when the last view of it is gone (the reply, the deferred store
 * write, the read-ahead window), and the next Buffer of the same size
 * takes it. */

#define BUF_CLASS ((Py_ssize_t)1 << 20) /* sizes are whole MiB (2 MiB from 512 KiB) */
#define BUF_HUGE ((Py_ssize_t)2 << 20)
#define BUF_POOL_MAX 64
static struct {
    char *ptr;
    Py_ssize_t cap;
} buf_pool[BUF_POOL_MAX];
static int buf_npool;
static Py_ssize_t buf_pool_bytes, buf_pool_limit = (Py_ssize_t)16 << 20;
static long long buf_made, buf_reused; /* fresh mappings, and buffers the pool gave */

typedef struct {
    PyObject_HEAD
    char *ptr;
    Py_ssize_t len, cap;
} BufferObject;

static char *
buf_take(Py_ssize_t cap)
{
    for (int i = buf_npool - 1; i >= 0; i--)
        if (buf_pool[i].cap == cap) {
            char *p = buf_pool[i].ptr;
            buf_pool[i] = buf_pool[--buf_npool];
            buf_pool_bytes -= cap;
            buf_reused++;
            return p;
        }
    char *p = mmap(NULL, (size_t)cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    buf_made++;
    /* faulted in by the first io_submit, in the submitter thread (a huge
     * page may need compaction first: ms, measured) */
    if (cap % BUF_HUGE == 0)
        madvise(p, (size_t)cap, MADV_HUGEPAGE); /* small pages if THP is off */
    return p;
}

static void
buf_give(char *p, Py_ssize_t cap)
{
    if (buf_npool < BUF_POOL_MAX && buf_pool_bytes + cap <= buf_pool_limit) {
        buf_pool[buf_npool].ptr = p;
        buf_pool[buf_npool++].cap = cap;
        buf_pool_bytes += cap;
    } else {
        munmap(p, (size_t)cap);
    }
}

static PyObject *
buffer_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"length", NULL};
    Py_ssize_t len;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n", kwlist, &len))
        return NULL;
    if (len <= 0 || len > ((Py_ssize_t)1 << 32)) {
        PyErr_SetString(PyExc_ValueError, "length must be 1 byte .. 4 GiB");
        return NULL;
    }
    BufferObject *self = (BufferObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    /* a 1 MiB read gets a whole huge page: faulted in, 2 MiB in one huge
     * page took ~295 µs, 1 MiB in small pages ~660 µs (measured) */
    Py_ssize_t class = len > BUF_HUGE / 4 ? BUF_HUGE : BUF_CLASS;
    self->cap = (len + class - 1) / class * class;
    self->ptr = buf_take(self->cap);
    if (!self->ptr) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->len = len;
    return (PyObject *)self;
}

static void
buffer_dealloc(BufferObject *self)
{
    if (self->ptr) /* no view is left: every view holds a reference */
        buf_give(self->ptr, self->cap);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
buffer_getbuffer(BufferObject *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->len, 0, flags);
}

static Py_ssize_t
buffer_length(BufferObject *self)
{
    return self->len;
}

static PyObject *
fast_pool(PyObject *module, PyObject *args)
{
    Py_ssize_t limit = -1;
    if (!PyArg_ParseTuple(args, "|n", &limit))
        return NULL;
    if (limit >= 0) {
        buf_pool_limit = limit;
        while (buf_npool && buf_pool_bytes > buf_pool_limit) {
            buf_npool--;
            buf_pool_bytes -= buf_pool[buf_npool].cap;
            munmap(buf_pool[buf_npool].ptr, (size_t)buf_pool[buf_npool].cap);
        }
    }
    return Py_BuildValue("(inLL)", buf_npool, buf_pool_bytes, buf_made, buf_reused);
}

static PyBufferProcs buffer_as_buffer = {(getbufferproc)buffer_getbuffer, NULL};
static PySequenceMethods buffer_as_sequence = {(lenfunc)buffer_length};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfs._fast.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Buffer(length): page-aligned writable memory, faulted in, pooled",
    .tp_new = buffer_new,
    .tp_dealloc = (destructor)buffer_dealloc,
    .tp_as_buffer = &buffer_as_buffer,
    .tp_as_sequence = &buffer_as_sequence,
};

/* ---- verify: a run's pages against their xxh3 in one call ---------------
 *
 * XXH3_64bits comes from the system's libxxhash (Debian's libxxhash0, which
 * apt itself depends on), found at run time: there is no header to build
 * against, so the one prototype is declared here.  Without the library,
 * has_xxh3() is False and the caller checks page by page in Python. */

typedef uint64_t (*xxh3_fn)(const void *, size_t);
static xxh3_fn xxh3;
static int xxh3_looked;

static xxh3_fn
get_xxh3(void)
{
    if (!xxh3_looked) {
        xxh3_looked = 1;
        void *lib = dlopen("libxxhash.so.0", RTLD_NOW | RTLD_LOCAL);
        if (lib)
            xxh3 = (xxh3_fn)dlsym(lib, "XXH3_64bits");
    }
    return xxh3;
}

static PyObject *
fast_has_xxh3(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(get_xxh3() != NULL);
}

/* verify(data, page_size, sums, pages, good): pages is a sequence of
 * (page, position in data); sums the page map's checksums (8-byte items).
 * Every page whose xxh3 matches goes into good as a view of data; the list
 * of those that do not is returned.  The hashing runs without the GIL. */
static PyObject *
fast_verify(PyObject *module, PyObject *args)
{
    PyObject *data, *sums_obj, *pages_obj, *good;
    Py_ssize_t ps;
    if (!PyArg_ParseTuple(args, "O!nOOO!", &PyMemoryView_Type, &data, &ps, &sums_obj,
                          &pages_obj, &PyDict_Type, &good))
        return NULL;
    xxh3_fn h = get_xxh3();
    if (!h) {
        PyErr_SetString(PyExc_RuntimeError, "libxxhash.so.0 (XXH3_64bits) not found");
        return NULL;
    }
    Py_buffer *dv = PyMemoryView_GET_BUFFER(data);
    if (!PyBuffer_IsContiguous(dv, 'C') || ps <= 0) {
        PyErr_SetString(PyExc_ValueError, "data must be contiguous, page_size positive");
        return NULL;
    }
    Py_buffer sums;
    if (PyObject_GetBuffer(sums_obj, &sums, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *seq = NULL, *bad = NULL;
    long long *pg = NULL, *pos = NULL;
    uint64_t *got = NULL;
    if (sums.itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "sums must hold 8-byte checksums");
        goto out;
    }
    seq = PySequence_Fast(pages_obj, "pages must be a sequence");
    if (!seq)
        goto out;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), nsums = sums.len / 8;
    pg = PyMem_Calloc(n ? n : 1, sizeof *pg);
    pos = PyMem_Calloc(n ? n : 1, sizeof *pos);
    got = PyMem_Calloc(n ? n : 1, sizeof *got);
    if (!pg || !pos || !got) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyArg_ParseTuple(item, "LL", &pg[i], &pos[i]))
            goto out;
        if (pg[i] < 0 || pg[i] >= nsums || pos[i] < 0 || pos[i] + ps > dv->len) {
            PyErr_Format(PyExc_ValueError, "page %lld at %lld does not fit", pg[i], pos[i]);
            goto out;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) /* ~0.45 µs a page: the GIL stays held (io_submit) */
        got[i] = h((const char *)dv->buf + pos[i], (size_t)ps);
    bad = PyList_New(0);
    if (!bad)
        goto out;
    const uint64_t *want = sums.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyLong_FromLongLong(pg[i]), *val = NULL;
        int err = !key;
        if (!err && got[i] == want[pg[i]]) {
            val = PySequence_GetSlice(data, pos[i], pos[i] + ps);
            err = !val || PyDict_SetItem(good, key, val) < 0;
        } else if (!err) {
            err = PyList_Append(bad, key) < 0;
        }
        Py_XDECREF(key);
        Py_XDECREF(val);
        if (err) {
            Py_CLEAR(bad);
            goto out;
        }
    }
out:
    Py_XDECREF(seq);
    PyMem_Free(pg);
    PyMem_Free(pos);
    PyMem_Free(got);
    PyBuffer_Release(&sums);
    return bad;
}

/* span(pages, first, count, page_size): pages[first .. first+count) as one
 * memoryview if they are views lying in order in one buffer (a READ answered
 * with the disk's own buffer, no copy); None otherwise. */
static PyObject *
fast_span(PyObject *module, PyObject *args)
{
    PyObject *pages;
    long long first, count, ps;
    if (!PyArg_ParseTuple(args, "O!LLL", &PyDict_Type, &pages, &first, &count, &ps))
        return NULL;
    if (count <= 0 || ps <= 0 || PyDict_Size(pages) < count)
        Py_RETURN_NONE;
    PyObject *exporter = NULL;
    const char *base = NULL;
    for (long long i = 0; i < count; i++) {
        PyObject *key = PyLong_FromLongLong(first + i);
        if (!key)
            return NULL;
        PyObject *v = PyDict_GetItemWithError(pages, key); /* borrowed */
        Py_DECREF(key);
        if (!v) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_NONE;
        }
        if (!PyMemoryView_Check(v))
            Py_RETURN_NONE;
        Py_buffer *b = PyMemoryView_GET_BUFFER(v);
        if (!PyBuffer_IsContiguous(b, 'C') || b->len != ps || !b->obj)
            Py_RETURN_NONE;
        if (i == 0) {
            exporter = b->obj;
            base = b->buf;
        } else if (b->obj != exporter || (const char *)b->buf != base + i * ps) {
            Py_RETURN_NONE;
        }
    }
    PyObject *whole = PyMemoryView_FromObject(exporter);
    if (!whole)
        return NULL;
    Py_buffer *wb = PyMemoryView_GET_BUFFER(whole);
    Py_ssize_t at = base - (const char *)wb->buf;
    PyObject *out;
    if (!PyBuffer_IsContiguous(wb, 'C') || wb->itemsize != 1 || at < 0 ||
            at + count * ps > wb->len) {
        out = Py_None;
        Py_INCREF(out);
    } else {
        out = PySequence_GetSlice(whole, at, at + (Py_ssize_t)(count * ps));
    }
    Py_DECREF(whole);
    return out;
}

static PyMethodDef fast_functions[] = {
    {"scatter", fast_scatter, METH_VARARGS,
     "scatter(dst, first, page_size, {page: data}): copy each page into dst"},
    {"verify", fast_verify, METH_VARARGS,
     "verify(data, page_size, sums, pages, good) -> the pages whose xxh3 does not match"},
    {"span", fast_span, METH_VARARGS,
     "span(pages, first, count, page_size) -> the pages as one memoryview, or None"},
    {"has_xxh3", fast_has_xxh3, METH_NOARGS, "whether verify can hash (libxxhash found)"},
    {"pool", fast_pool, METH_VARARGS,
     "pool([limit]) -> (idle buffers, their bytes, mappings made, buffers reused);\n"
     "limit: bytes kept idle at most"},
    {NULL}
};

static PyMethodDef aio_methods[] = {
    {"submit", (PyCFunction)aio_submit, METH_VARARGS,
     "submit(fd, buf, offset, key): read len(buf) bytes at offset into buf"},
    {"reap", (PyCFunction)aio_reap, METH_VARARGS,
     "reap(clear=True) -> [(key, bytes read or -errno)] of the completed reads;\n"
     "clear=False leaves the eventfd readable (whoever waits on it still wakes)"},
    {"close", (PyCFunction)aio_close, METH_NOARGS, "wait for reads in flight, free"},
    {NULL}
};

static PyGetSetDef aio_getset[] = {
    {"fd", (getter)aio_get_fd, NULL, "the eventfd that becomes readable on completion", NULL},
    {"inflight", (getter)aio_get_inflight, NULL, "reads submitted and not reaped", NULL},
    {NULL}
};

static PyTypeObject AIOType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfs._fast.AIO",
    .tp_basicsize = sizeof(AIOObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Linux native AIO reads signalled on an eventfd",
    .tp_new = aio_new,
    .tp_init = (initproc)aio_init,
    .tp_dealloc = (destructor)aio_dealloc,
    .tp_methods = aio_methods,
    .tp_getset = aio_getset,
};

static struct PyModuleDef fastmodule = {
    PyModuleDef_HEAD_INIT, "memfs._fast",
    "Compiled helpers for memfs's hot path (Linux native AIO reads, their buffers, page checks and copies).", -1,
    fast_functions
};

PyMODINIT_FUNC
PyInit__fast(void)
{
    if (PyType_Ready(&AIOType) < 0 || PyType_Ready(&BufferType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastmodule);
    if (!m)
        return NULL;
    Py_INCREF(&AIOType);
    if (PyModule_AddObject(m, "AIO", (PyObject *)&AIOType) < 0) {
        Py_DECREF(&AIOType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&BufferType);
    if (PyModule_AddObject(m, "Buffer", (PyObject *)&BufferType) < 0) {
        Py_DECREF(&BufferType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
