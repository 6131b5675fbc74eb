/* An awaitable that is already done, with a value: what recv() and ``async for`` return when a
 * message is queued.  Awaiting it hands the value back through am_send (Python 3.10+), so the
 * common case costs one small object -- no coroutine, no future, no StopIteration.  (A Cython
 * async def would cost a coroutine, its await wrapper and three deallocations per message.)
 * Old-style iteration (tp_iternext, for callers that do not use am_send) raises StopIteration. */
#ifndef FASTWS_READY_H
#define FASTWS_READY_H

#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *value; /* NULL once handed out */
} fastws_ReadyValue;

static void fastws_ready_dealloc(PyObject *self) {
    Py_XDECREF(((fastws_ReadyValue *)self)->value);
    PyObject_Free(self);
}

static PyObject *fastws_ready_await(PyObject *self) {
    Py_INCREF(self); /* it is its own iterator */
    return self;
}

static PySendResult fastws_ready_send(PyObject *self, PyObject *arg, PyObject **result) {
    fastws_ReadyValue *ready = (fastws_ReadyValue *)self;
    (void)arg;
    *result = ready->value ? ready->value : Py_NewRef(Py_None); /* the reference passes on */
    ready->value = NULL;
    return PYGEN_RETURN;
}

/* Raise StopIteration(value) -- an instance, so that a tuple value stays whole; steals ``value``. */
static PyObject *fastws_stop_iteration(PyObject *value) {
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
    Py_DECREF(value);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    return NULL;
}

static PyObject *fastws_ready_next(PyObject *self) {
    fastws_ReadyValue *ready = (fastws_ReadyValue *)self;
    PyObject *value = ready->value ? ready->value : Py_NewRef(Py_None);
    ready->value = NULL;
    return fastws_stop_iteration(value);
}

/* The generator-style methods, for code that drives awaitables by hand: send(x) is next(); an
 * exception thrown in is raised (it never suspends, so nothing is waiting to take it). */
static PyObject *fastws_ready_send_method(PyObject *self, PyObject *arg) {
    (void)arg;
    return fastws_ready_next(self);
}

static PyObject *fastws_ready_throw(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *exc;
    (void)self;
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return NULL;
    }
    exc = args[0];
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else if (PyExceptionClass_Check(exc))
        PyErr_SetObject(exc, nargs > 1 ? args[1] : NULL);
    else
        PyErr_SetString(PyExc_TypeError, "exceptions must be classes or instances deriving from BaseException");
    return NULL;
}

static PyObject *fastws_ready_close(PyObject *self, PyObject *unused) {
    (void)unused;
    Py_CLEAR(((fastws_ReadyValue *)self)->value);
    Py_RETURN_NONE;
}

static PyMethodDef fastws_ready_methods[] = {
    {"send", (PyCFunction)fastws_ready_send_method, METH_O, "send(value): the awaitable's result, as StopIteration."},
    {"throw", (PyCFunction)(void (*)(void))fastws_ready_throw, METH_FASTCALL, "throw(exc): raise exc."},
    {"close", (PyCFunction)fastws_ready_close, METH_NOARGS, "close(): drop the value."},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods fastws_ready_async = {
    .am_await = fastws_ready_await,
    .am_send = fastws_ready_send,
};

static PyTypeObject fastws_ReadyValueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastws._frame.ReadyValue",
    .tp_basicsize = sizeof(fastws_ReadyValue),
    .tp_dealloc = fastws_ready_dealloc,
    .tp_as_async = &fastws_ready_async,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An already finished awaitable with a value (a queued message).",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = fastws_ready_next,
    .tp_methods = fastws_ready_methods,
};

/* -1 with an exception if the type could not be readied (module initialisation). */
static int fastws_ready_init(void) { return PyType_Ready(&fastws_ReadyValueType); }

/* A new ReadyValue for ``value`` (a new reference), or NULL with an exception. */
static PyObject *fastws_ready_value(PyObject *value) {
    fastws_ReadyValue *ready = PyObject_New(fastws_ReadyValue, &fastws_ReadyValueType);
    if (ready == NULL) return NULL;
    Py_INCREF(value);
    ready->value = value;
    return (PyObject *)ready;
}


/* ------------------------------------------------------------------------------------------------
 * Waiting: what recv() and ``async for`` return when the inbox is empty.  One per inbox, reused for
 * every wait: a future-like object that asyncio's Task parks on (it yields itself with
 * _asyncio_future_blocking set, the task hands it its wake-up callback through add_done_callback),
 * so a wait costs no Future, no coroutine and no awaitable iterator.  Resuming asks the owner's
 * ``poll`` for the next message: a new reference (the await's result), NULL with an exception
 * (raised into the awaiting code: the end of the stream), or the ``not_ready`` sentinel (wait on).
 * The owner wakes the waiting task either through the loop (fastws_waiting_schedule: call_soon, as a
 * Future does) or at once (fastws_waiting_run: the task steps right here, in its own context: the
 * owner checks that no other task is running). */

typedef PyObject *(*fastws_poll_fn)(PyObject *owner, int iterating);

enum { WAIT_IDLE = 0, WAIT_ARMED = 1, WAIT_WOKEN = 2, WAIT_CANCELLED = 3 };

typedef struct {
    PyObject_HEAD
    PyObject *owner;
    PyObject *loop;
    PyObject *not_ready;
    PyObject *callback;   /* the task's wake-up, while a task waits */
    PyObject *context;
    PyObject *cancel_msg;
    vectorcallfunc vectorcall; /* fastws_waiting_call */
    fastws_poll_fn poll;
    char iterating;       /* poll's mode: ``async for`` (a clean close ends it) or recv() */
    char state;           /* WAIT_* */
    char blocking;        /* _asyncio_future_blocking */
} fastws_Waiting;

static PyObject *fastws_call_soon_str, *fastws_call_soon_kwnames, *fastws_cancelled_error;

static int fastws_waiting_traverse(PyObject *self, visitproc visit, void *arg) {
    fastws_Waiting *w = (fastws_Waiting *)self;
    Py_VISIT(w->owner);
    Py_VISIT(w->loop);
    Py_VISIT(w->callback);
    Py_VISIT(w->context);
    Py_VISIT(w->cancel_msg);
    return 0;
}

static int fastws_waiting_clear(PyObject *self) {
    fastws_Waiting *w = (fastws_Waiting *)self;
    Py_CLEAR(w->owner);
    Py_CLEAR(w->loop);
    Py_CLEAR(w->callback);
    Py_CLEAR(w->context);
    Py_CLEAR(w->cancel_msg);
    return 0;
}

static void fastws_waiting_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    fastws_waiting_clear(self);
    Py_XDECREF(((fastws_Waiting *)self)->not_ready);
    PyObject_GC_Del(self);
}

/* Back to idle: the await is over (a result, an exception thrown in, or closed). */
static void fastws_waiting_reset(fastws_Waiting *w) {
    w->state = WAIT_IDLE;
    w->blocking = 0;
    Py_CLEAR(w->callback);
    Py_CLEAR(w->context);
    Py_CLEAR(w->cancel_msg);
}

static PyObject *fastws_cancelled(fastws_Waiting *w) {
    PyObject *exc = w->cancel_msg ? PyObject_CallOneArg(fastws_cancelled_error, w->cancel_msg)
                                  : PyObject_CallNoArgs(fastws_cancelled_error);
    if (exc != NULL) {
        PyErr_SetObject(fastws_cancelled_error, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PySendResult fastws_waiting_send(PyObject *self, PyObject *arg, PyObject **result) {
    fastws_Waiting *w = (fastws_Waiting *)self;
    PyObject *value;
    (void)arg;
    if (w->state == WAIT_CANCELLED) { /* resumed instead of thrown into: still a cancellation */
        fastws_cancelled(w);
        fastws_waiting_reset(w);
        *result = NULL;
        return PYGEN_ERROR;
    }
    if (w->owner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the connection this awaitable belonged to is gone");
        *result = NULL;
        return PYGEN_ERROR;
    }
    value = w->poll(w->owner, w->iterating);
    if (value == w->not_ready) {
        Py_DECREF(value);
        w->state = WAIT_ARMED;
        w->blocking = 1;
        *result = Py_NewRef(self); /* to the task: park on me */
        return PYGEN_NEXT;
    }
    fastws_waiting_reset(w);
    *result = value;
    return value != NULL ? PYGEN_RETURN : PYGEN_ERROR;
}

static PyObject *fastws_waiting_next(PyObject *self) {
    PyObject *result;
    switch (fastws_waiting_send(self, Py_None, &result)) {
    case PYGEN_NEXT:
        return result;
    case PYGEN_RETURN:
        return fastws_stop_iteration(result);
    default:
        return NULL;
    }
}

static PyObject *fastws_waiting_send_method(PyObject *self, PyObject *arg) {
    (void)arg;
    return fastws_waiting_next(self);
}

static PyObject *fastws_waiting_throw(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    fastws_waiting_reset((fastws_Waiting *)self);
    return fastws_ready_throw(self, args, nargs);
}

static PyObject *fastws_waiting_close(PyObject *self, PyObject *unused) {
    (void)unused;
    fastws_waiting_reset((fastws_Waiting *)self);
    Py_RETURN_NONE;
}

/* What the task's wake-up callback is handed.  A task's wake-up only asks that future for its
 * result(): for a wake by a message it gets a Future that finished with None, on which the C Task
 * takes its fast path (an exact Future: no method looked up by name, about 1,400 instructions less
 * per message); a cancelled wait hands itself, so that result() raises the CancelledError.  The
 * done Future is made once, on the first loop that needs one. */
static PyObject *fastws_done_future;

static PyObject *fastws_wake_arg(fastws_Waiting *w) {
    PyObject *fut, *r;
    if (w->state == WAIT_CANCELLED)
        return (PyObject *)w;
    if (fastws_done_future == NULL) {
        fut = PyObject_CallMethod(w->loop, "create_future", NULL);
        r = fut != NULL ? PyObject_CallMethod(fut, "set_result", "O", Py_None) : NULL;
        if (r == NULL) { /* then the plain way: result() on this object */
            PyErr_Clear();
            Py_XDECREF(fut);
            return (PyObject *)w;
        }
        Py_DECREF(r);
        fastws_done_future = fut;
    }
    return fastws_done_future;
}

/* call_soon(callback, <wake arg>, context=context), as a Future's set_result does; 0, or -1 with an exception */
static int fastws_waiting_schedule(PyObject *self) {
    fastws_Waiting *w = (fastws_Waiting *)self;
    PyObject *callback = w->callback, *context = w->context, *handle;
    if (callback == NULL)
        return 0;
    w->callback = w->context = NULL;
    {
        PyObject *args[4] = {w->loop, callback, fastws_wake_arg(w), context};
        handle = PyObject_VectorcallMethod(fastws_call_soon_str, args, 3, fastws_call_soon_kwnames);
    }
    Py_DECREF(callback);
    Py_DECREF(context);
    if (handle == NULL)
        return -1;
    Py_DECREF(handle);
    return 0;
}

/* The waiting task steps now, in its context (what the loop would do a turn later).  The caller
 * made sure that no task is running.  0, or -1 with the exception that escaped the step. */
static int fastws_waiting_run(PyObject *self) {
    fastws_Waiting *w = (fastws_Waiting *)self;
    PyObject *callback = w->callback, *context = w->context, *r;
    if (callback == NULL)
        return 0;
    if (PyContext_Enter(context) < 0) { /* that context is running already: let the loop do it */
        PyErr_Clear();
        return fastws_waiting_schedule(self);
    }
    w->callback = w->context = NULL;
    r = PyObject_CallOneArg(callback, fastws_wake_arg(w));
    if (PyContext_Exit(context) < 0)
        Py_CLEAR(r);
    Py_DECREF(callback);
    Py_DECREF(context);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* A message came (or the stream ended): 1 if a task was waiting (call schedule or run next), else 0. */
static int fastws_waiting_wake(PyObject *self) {
    fastws_Waiting *w = (fastws_Waiting *)self;
    if (w->state != WAIT_ARMED)
        return 0;
    w->state = WAIT_WOKEN;
    return w->callback != NULL;
}

static int fastws_waiting_busy(PyObject *self) { return ((fastws_Waiting *)self)->state != WAIT_IDLE; }

/* -- the Future interface asyncio's Task uses --------------------------------------------------- */

/* Interned names the Task uses; attribute lookups compare the pointer first, then the text. */
static PyObject *fastws_blocking_name, *fastws_get_loop_name, *fastws_add_done_callback_name, *fastws_context_name;

static int fastws_is_name(PyObject *name, PyObject *interned) {
    if (name == interned)
        return 1;
    if (!PyUnicode_Check(name) || PyUnicode_GET_LENGTH(name) != PyUnicode_GET_LENGTH(interned))
        return 0;
    if (PyUnicode_IS_COMPACT_ASCII(name)) /* the usual case: a memcmp, not PyUnicode_Compare */
        return memcmp(PyUnicode_DATA(name), PyUnicode_DATA(interned), (size_t)PyUnicode_GET_LENGTH(name)) == 0;
    return PyUnicode_Compare(name, interned) == 0;
}

/* Both calls of the Future protocol that asyncio's Task makes on every wait, get_loop() and
 * add_done_callback(fn, context=...), are calls of the object itself: ``w.get_loop`` and
 * ``w.add_done_callback`` are ``w`` (fastws_waiting_getattro), so that parking allocates no bound
 * method (two per wait otherwise, about 600 instructions per message).  The call tells them apart
 * by its arguments: none is get_loop(), one is add_done_callback(). */
static PyObject *fastws_waiting_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    fastws_Waiting *w = (fastws_Waiting *)self;
    PyObject *context = NULL;
    Py_ssize_t i, nargs = PyVectorcall_NARGS(nargsf), nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs == 0 && nkw == 0)
        return Py_NewRef(w->loop); /* get_loop() */
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "add_done_callback(fn, *, context=None)");
        return NULL;
    }
    for (i = 0; i < nkw; i++) {
        /* (asyncio's Task builds its ("context",) without interning it: compared by its text) */
        if (!fastws_is_name(PyTuple_GET_ITEM(kwnames, i), fastws_context_name)) {
            PyErr_SetString(PyExc_TypeError, "add_done_callback(fn, *, context=None)");
            return NULL;
        }
        context = args[nargs + i];
    }
    if (w->callback != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "another coroutine is already waiting for the next message");
        return NULL;
    }
    context = (context == NULL || context == Py_None) ? PyContext_CopyCurrent() : Py_NewRef(context);
    if (context == NULL)
        return NULL;
    w->callback = Py_NewRef(args[0]);
    w->context = context;
    if (w->state == WAIT_WOKEN || w->state == WAIT_CANCELLED) { /* done already: as a Future would */
        if (fastws_waiting_schedule(self) < 0)
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *fastws_waiting_remove_done_callback(PyObject *self, PyObject *fn) {
    fastws_Waiting *w = (fastws_Waiting *)self;
    int same = w->callback != NULL ? PyObject_RichCompareBool(w->callback, fn, Py_EQ) : 0;
    if (same < 0)
        return NULL;
    if (same) {
        Py_CLEAR(w->callback);
        Py_CLEAR(w->context);
    }
    return PyLong_FromLong(same);
}

static PyObject *fastws_waiting_cancel(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames) {
    fastws_Waiting *w = (fastws_Waiting *)self;
    PyObject *msg = nargs > 0 ? args[0] : (kwnames && PyTuple_GET_SIZE(kwnames) ? args[nargs] : Py_None);
    if (w->state != WAIT_ARMED)
        Py_RETURN_FALSE;
    w->state = WAIT_CANCELLED;
    Py_XSETREF(w->cancel_msg, msg == Py_None ? NULL : Py_NewRef(msg));
    if (fastws_waiting_schedule(self) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *fastws_waiting_cancelled(PyObject *self, PyObject *unused) {
    (void)unused;
    return PyBool_FromLong(((fastws_Waiting *)self)->state == WAIT_CANCELLED);
}

static PyObject *fastws_waiting_done(PyObject *self, PyObject *unused) {
    int state = ((fastws_Waiting *)self)->state;
    (void)unused;
    return PyBool_FromLong(state == WAIT_WOKEN || state == WAIT_CANCELLED);
}

static PyObject *fastws_waiting_result(PyObject *self, PyObject *unused) {
    (void)unused;
    if (((fastws_Waiting *)self)->state == WAIT_CANCELLED)
        return fastws_cancelled((fastws_Waiting *)self);
    Py_RETURN_NONE; /* the message itself comes from resuming the await */
}

/* _asyncio_future_blocking exists on instances only: asyncio.isfuture() looks at the class, and a
 * Future-like class would make ensure_future(ws.recv()) hand back this object itself instead of
 * running the await in a task.  get_loop and add_done_callback: see fastws_waiting_call. */
static PyObject *fastws_waiting_getattro(PyObject *self, PyObject *name) {
    if (fastws_is_name(name, fastws_blocking_name))
        return PyBool_FromLong(((fastws_Waiting *)self)->blocking);
    if (fastws_is_name(name, fastws_add_done_callback_name) || fastws_is_name(name, fastws_get_loop_name))
        return Py_NewRef(self);
    return PyObject_GenericGetAttr(self, name);
}

static int fastws_waiting_setattro(PyObject *self, PyObject *name, PyObject *value) {
    int truth;
    if (!fastws_is_name(name, fastws_blocking_name))
        return PyObject_GenericSetAttr(self, name, value);
    truth = value ? PyObject_IsTrue(value) : 0;
    if (truth < 0)
        return -1;
    ((fastws_Waiting *)self)->blocking = (char)truth;
    return 0;
}

static PyMethodDef fastws_waiting_methods[] = {
    {"send", (PyCFunction)fastws_waiting_send_method, METH_O, NULL},
    {"throw", (PyCFunction)(void (*)(void))fastws_waiting_throw, METH_FASTCALL, NULL},
    {"close", (PyCFunction)fastws_waiting_close, METH_NOARGS, NULL},
    {"remove_done_callback", (PyCFunction)fastws_waiting_remove_done_callback, METH_O, NULL},
    {"cancel", (PyCFunction)(void (*)(void))fastws_waiting_cancel, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"cancelled", (PyCFunction)fastws_waiting_cancelled, METH_NOARGS, NULL},
    {"done", (PyCFunction)fastws_waiting_done, METH_NOARGS, NULL},
    {"result", (PyCFunction)fastws_waiting_result, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods fastws_waiting_async = {
    .am_await = fastws_ready_await,
    .am_send = fastws_waiting_send,
};

static PyTypeObject fastws_WaitingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastws._frame.Waiting",
    .tp_basicsize = sizeof(fastws_Waiting),
    .tp_dealloc = fastws_waiting_dealloc,
    .tp_as_async = &fastws_waiting_async,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The awaitable of a wait for the next message (one per inbox, reused).",
    .tp_traverse = fastws_waiting_traverse,
    .tp_clear = fastws_waiting_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = fastws_waiting_next,
    .tp_methods = fastws_waiting_methods,
    .tp_getattro = fastws_waiting_getattro,
    .tp_setattro = fastws_waiting_setattro,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(fastws_Waiting, vectorcall),
};

static int fastws_waiting_init(PyObject *cancelled_error) {
    fastws_call_soon_str = PyUnicode_InternFromString("call_soon");
    fastws_call_soon_kwnames = Py_BuildValue("(s)", "context");
    fastws_blocking_name = PyUnicode_InternFromString("_asyncio_future_blocking");
    fastws_get_loop_name = PyUnicode_InternFromString("get_loop");
    fastws_add_done_callback_name = PyUnicode_InternFromString("add_done_callback");
    fastws_context_name = PyUnicode_InternFromString("context");
    if (fastws_call_soon_str == NULL || fastws_call_soon_kwnames == NULL || fastws_blocking_name == NULL ||
        fastws_get_loop_name == NULL || fastws_add_done_callback_name == NULL || fastws_context_name == NULL)
        return -1;
    fastws_cancelled_error = Py_NewRef(cancelled_error);
    return PyType_Ready(&fastws_WaitingType);
}

/* The waiting awaitable of ``owner``; iterating and poll's answers as described above. */
static PyObject *fastws_waiting_new(PyObject *owner, PyObject *loop, fastws_poll_fn poll, PyObject *not_ready) {
    fastws_Waiting *w = PyObject_GC_New(fastws_Waiting, &fastws_WaitingType);
    if (w == NULL)
        return NULL;
    w->owner = Py_NewRef(owner);
    w->loop = Py_NewRef(loop);
    w->not_ready = Py_NewRef(not_ready);
    w->callback = w->context = w->cancel_msg = NULL;
    w->vectorcall = fastws_waiting_call;
    w->poll = poll;
    w->iterating = 0;
    w->state = WAIT_IDLE;
    w->blocking = 0;
    PyObject_GC_Track((PyObject *)w);
    return (PyObject *)w;
}

static void fastws_waiting_set_mode(PyObject *self, int iterating) { ((fastws_Waiting *)self)->iterating = iterating; }

#endif
