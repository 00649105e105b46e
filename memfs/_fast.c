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
#include "_fast.h"


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
