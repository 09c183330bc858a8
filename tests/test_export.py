"""Where PyTorch models go: FX, torch.export, torch.compile (static and dynamic
shapes, forward and backward), TorchScript and ONNX, on the CPU (CI) and on
the GPU (marked cuda). Every graph must hold one opaque cupy_roi op (or a leaf
call) per operator call and give the eager results."""
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch

import cupy_roi

from . import cases

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


class AllOps(torch.nn.Module):
    """Every operator once, through its module and its function; returns the tuple of outputs."""

    def __init__(self):
        super().__init__()
        self.align = cupy_roi.RoIAlign((3, 2), 0.5, 2, aligned=True)
        self.ps_align = cupy_roi.PSRoIAlign(2, 0.5, -1)
        self.pool = cupy_roi.RoIPool(2, 0.5)
        self.prroi = cupy_roi.PrRoIPool2D(2, 3, 0.5)

    def forward(self, x, rois):
        return (self.align(x, rois), self.ps_align(x, rois), self.pool(x, rois),
                cupy_roi.ps_roi_pool(x, rois, 2, 0.5), self.prroi(x, rois), cupy_roi.ps_prroi_pool(x, rois, 2, 0.5),
                cupy_roi.roi_align(x, rois, 2, 0.5, 0, False))


N_OPS = 7  # calls in AllOps.forward


def inputs(device, k=6, dtype=torch.float32, grad=False):
    g = cases.rng()
    x, r = cases.make(g, n=2, c_out=8, h=9, w=11, ph=2, pw=2, k=k)
    x = torch.tensor(x, dtype=dtype, device=device).requires_grad_(grad)
    return x, torch.tensor(r, dtype=torch.float32, device=device)


def assert_all_close(got, want, atol=1e-5):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, i
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=f"output {i}")


def cupy_roi_calls(graph):
    return [n for n in graph.nodes if n.op == "call_function" and "cupy_roi" in str(n.target)]


# ------------------------------------------------------------------------- FX

@pytest.mark.parametrize("device", DEVICES)
def test_fx_traces_every_op_as_a_leaf(device):
    x, r = inputs(device)
    model = AllOps()
    gm = torch.fx.symbolic_trace(model)
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert [f.__name__ for f in leaves] == ["roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "prroi_pool2d",
                                            "ps_prroi_pool", "roi_align"]
    assert_all_close(gm(x, r), model(x, r), atol=0)


def test_fx_leaf_also_for_calls_through_the_package_and_lists_of_boxes():
    class UserCode(torch.nn.Module):
        def forward(self, x, boxes0, boxes1):
            return cupy_roi.roi_align(x, [boxes0, boxes1], 2, 0.5) * 2

    x, r = inputs("cpu")
    b0, b1 = r[r[:, 0] == 0, 1:], r[r[:, 0] == 1, 1:]
    gm = torch.fx.symbolic_trace(UserCode())
    assert any(n.target is cupy_roi.roi_align for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x, b0, b1), UserCode()(x, b0, b1), atol=0, rtol=0)


def test_torchvision_feature_extraction():
    fe = pytest.importorskip("torchvision.models.feature_extraction")

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.pool = cupy_roi.RoIAlign(2, 0.5, 2, True)

        def forward(self, x, rois):
            return self.pool(torch.relu(self.conv(x)), rois).flatten(1)

    x, r = inputs("cpu")
    train_nodes, eval_nodes = fe.get_graph_node_names(Head())
    assert any("roi_align" in n for n in eval_nodes), eval_nodes
    extractor = fe.create_feature_extractor(Head(), return_nodes={"relu": "features", "flatten": "pooled"})
    out = extractor(x.detach(), r)
    assert out["pooled"].shape == (r.shape[0], 8 * 4)


# ------------------------------------------------------------------ torch.export

@pytest.mark.parametrize("device", DEVICES)
def test_export_runs_and_matches_eager(device):
    x, r = inputs(device)
    model = AllOps()
    program = torch.export.export(model, (x, r))
    assert len(cupy_roi_calls(program.graph)) == N_OPS
    assert_all_close(program.module()(x, r), model(x, r))
    x2, r2 = inputs(device)  # fresh data through the same program
    assert_all_close(program.module()(x2, r2), model(x2, r2))


@pytest.mark.parametrize("device", DEVICES)
def test_export_with_a_dynamic_number_of_rois(device):
    x, r = inputs(device, k=6)
    model = AllOps()
    k = torch.export.Dim("k", min=1, max=1000)
    program = torch.export.export(model, (x, r), dynamic_shapes=({}, {0: k}))
    for count in (1, 3, 11):
        rr = torch.cat([r, r])[:count] if count <= 12 else r
        assert_all_close(program.module()(x, rr), model(x, rr))


def test_exported_cpu_program_still_rejects_bad_rois():
    x, r = inputs("cpu")
    program = torch.export.export(AllOps(), (x, r))
    bad = r.clone()
    bad[0, 0] = 5  # batch index outside [0, 2)
    with pytest.raises(ValueError, match="rois"):
        program.module()(x, bad)


# ---------------------------------------------------------------- torch.compile

def _compile_counter():
    from torch._dynamo.testing import CompileCounterWithBackend
    return CompileCounterWithBackend("inductor")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_forward_and_backward(device):
    torch._dynamo.reset()
    x, r = inputs(device, grad=True)
    rc = r.clone().requires_grad_(True)  # PrRoIPool's box gradient through the compiled graph
    model = AllOps()
    counter = _compile_counter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)

    def loss_and_grads(fn):
        x.grad = rc.grad = None
        outs = fn(x, rc)
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        loss.backward()
        return outs, x.grad.clone(), rc.grad.clone()

    got, gx, gr = loss_and_grads(compiled)
    want, wx, wr = loss_and_grads(model)
    assert_all_close(got, want)
    torch.testing.assert_close(gx, wx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gr, wr, atol=1e-4, rtol=1e-4)
    assert counter.frame_count >= 1


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_number_of_rois_without_recompiling(device):
    torch._dynamo.reset()
    x, r = inputs(device, k=6)
    model = AllOps()
    counter = _compile_counter()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    rr = torch.cat([r, r, r])
    assert_all_close(compiled(x, rr[:6]), model(x, rr[:6]))
    compiled_frames = counter.frame_count  # what the first call compiled
    for count in (2, 9, 17):
        assert_all_close(compiled(x, rr[:count]), model(x, rr[:count]))
    assert counter.frame_count == compiled_frames, "a new number of RoIs recompiled"


# ------------------------------------------------------------------ TorchScript

@pytest.mark.parametrize("device", DEVICES)
def test_torchscript_functions_and_modules(device):
    x, r = inputs(device, grad=True)
    model = AllOps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    assert_all_close(scripted(x, r), model(x, r))
    scripted(x, r)[0].sum().backward()  # custom ops carry their autograd into TorchScript
    assert x.grad is not None and x.grad.abs().sum() > 0

    @torch.jit.script
    def listed(x: torch.Tensor, b0: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
        return cupy_roi.roi_align(x, [b0, b1], [2, 2], 0.5, 2, True)

    b0, b1 = r[r[:, 0] == 0, 1:], r[r[:, 0] == 1, 1:]
    want = cupy_roi.roi_align(x.detach(), [b0, b1], 2, 0.5, 2, True)
    torch.testing.assert_close(listed(x.detach(), b0, b1), want)


# ------------------------------------------------------------------------- ONNX

def _onnx_run(model, args):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamo=True, verbose=False)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        program.save(path)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
        return [n.op_type for n in program.model.graph], session.run(None, feeds)[0]


@pytest.mark.parametrize("op, call, onnx_op", [
    ("roi_align aligned", lambda x, r: cupy_roi.roi_align(x, r, (3, 2), 0.5, 2, True), "RoiAlign"),
    ("roi_align legacy", lambda x, r: cupy_roi.roi_align(x, r, 2, 0.25, -1, False), "RoiAlign"),
    ("roi_align adaptive", lambda x, r: cupy_roi.roi_align(x, r, 3, 0.5, 0, True), "RoiAlign"),
    ("roi_pool", lambda x, r: cupy_roi.roi_pool(x, r, (2, 3), 0.5), "MaxRoiPool"),
])
def test_onnx_export_matches_onnxruntime(op, call, onnx_op):
    class Model(torch.nn.Module):
        def forward(self, x, r):
            return call(x, r)

    x, r = inputs("cpu", k=9)
    op_types, got = _onnx_run(Model(), (x, r))
    assert onnx_op in op_types
    np.testing.assert_allclose(got, call(x, r).numpy(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("call", [lambda x, r: cupy_roi.ps_roi_align(x, r, 2, 0.5),
                                  lambda x, r: cupy_roi.prroi_pool2d(x, r, 2, 2, 0.5)],
                         ids=["ps_roi_align", "prroi_pool2d"])
def test_onnx_export_refuses_ops_onnx_lacks(call):
    pytest.importorskip("onnxscript")

    class Model(torch.nn.Module):
        def forward(self, x, r):
            return call(x, r)

    x, r = inputs("cpu")
    with warnings.catch_warnings(), pytest.raises(Exception) as info:
        warnings.simplefilter("ignore")
        torch.onnx.export(Model(), (x, r), dynamo=True, verbose=False)
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("cupy_roi" in text for text in chain)
