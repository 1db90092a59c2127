import os

# Triton kernels run on CPU tensors through the interpreter; this must be set before triton is imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models are dominated by per-op overhead: one thread per process is faster than two fighting
# (and pytest-xdist runs one process per core).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    slow_ok = os.environ.get("HYBRIDIZE_SLOW") == "1"
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not slow_ok:
            item.add_marker(pytest.mark.skip(reason="slow test: set HYBRIDIZE_SLOW=1 to run"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Code under test may change the thread count (the demo picks its own): back to one per module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _vectorised_interpreter_scan():
    """The interpreter evaluates tl.associative_scan one element at a time in Python. Evaluate the
    combine function on whole slices along the scan axis instead — the same sequential order, so the
    same results for element-wise combine functions like ours (reverse scans are flips around this,
    done by the interpreter). Left alone if the interpreter's internals differ from what we expect."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return
    scan_ops = getattr(interpreter, "ScanOps", None)
    if scan_ops is None or not hasattr(scan_ops, "generic_scan") or getattr(scan_ops, "_hybridize", False):
        return

    def generic_scan(self, input):
        datas = [arg.handle.data for arg in input]
        ax, nd = self.axis, datas[0].ndim
        at = lambda i: tuple(i if d == ax else slice(None) for d in range(nd))  # noqa: E731
        outs = [np.empty_like(d) for d in datas]
        acc = [d[at(0)] for d in datas]
        for o, v in zip(outs, acc):
            o[at(0)] = v
        for i in range(1, datas[0].shape[ax]):
            lhs = tuple(self.to_tensor(v, arg.dtype) for v, arg in zip(acc, input))
            rhs = tuple(self.to_tensor(d[at(i)], arg.dtype) for d, arg in zip(datas, input))
            ret = self.combine_fn.fn(*lhs, *rhs)
            ret = ret if isinstance(ret, tuple) else (ret,)
            acc = [r.handle.data if isinstance(r, tl.core.tensor) else r for r in ret]
            for o, v in zip(outs, acc):
                o[at(i)] = v
        return [self.to_tensor(o, arg.dtype) for o, arg in zip(outs, input)]

    scan_ops.generic_scan = generic_scan
    scan_ops._hybridize = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _vectorised_interpreter_scan()
