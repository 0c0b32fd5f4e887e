"""MNN finding 4: LSTMs on GPU backends, with MNN's plain Python API (no plugin code).

Runs the two LSTM fixtures (fixtures/control_flow: lstm_while.mnn, the converter's default While
loop, which only the Module API runs; lstm_origin.mnn, converted with --useOriginRNNImpl) on CPU
and on each GPU backend at precision high, with one seeded input, and prints each output's cosine
against the CPU's.  On a CPU-only build every GPU backend falls back to the CPU (all 1.0).

    python benchmarks/gpu_lstm_raw.py
"""
import numpy as np, MNN
nn, F = MNN.nn, MNN.expr
x = np.random.default_rng(0).random((4, 1, 8), dtype=np.float32)
def cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
def module(path, backend):
    rt = nn.create_runtime_manager(({"backend": backend, "precision": 1, "numThread": 4 if backend != "CPU" else 1},))
    m = nn.load_module_from_file(path, [], [], runtime_manager=rt)
    outs = m.forward([F.const(x, list(x.shape), F.NCHW, F.float)])
    names = m.get_info()["outputNames"]
    res = {}
    for n, v in zip(names, outs):
        if v.data_format == F.NC4HW4: v = F.convert(v, F.NCHW)
        res[n] = np.array(v.read(), copy=True)
    return res
def session(path, backend):
    it = MNN.Interpreter(path)
    s = it.createSession({"backend": backend, "precision": 1, "numThread": 4 if backend != "CPU" else 1})
    t = it.getSessionInput(s)
    t.copyFrom(MNN.Tensor(x.shape, MNN.Halide_Type_Float, x, MNN.Tensor_DimensionType_Caffe))
    if int(it.runSession(s)) != 0:
        raise RuntimeError(f"runSession failed on {backend}")
    res = {}
    for n, o in it.getSessionOutputAll(s).items():
        h = MNN.Tensor(o, o.getDimensionType()); o.copyToHostTensor(h); res[n] = np.array(h.getNumpyData(), copy=True)
    return res
for label, fn, path in (("module lstm_while", module, "fixtures/control_flow/lstm_while.mnn"),
                        ("module lstm_origin", module, "fixtures/control_flow/lstm_origin.mnn"),
                        ("session lstm_origin", session, "fixtures/control_flow/lstm_origin.mnn")):
    ref = fn(path, "CPU")
    for b in ("OPENCL", "VULKAN", "CUDA"):
        try:
            got = fn(path, b)
            print(label, b, {n: round(cos(got[n], ref[n]), 4) for n in ref})
        except Exception as e:
            print(label, b, "error", e)
