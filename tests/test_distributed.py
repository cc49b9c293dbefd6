"""The sharding rule, the launch environment, memory bounds and the CUDA-only projection path on CPU.

The multi-process runs themselves (torchrun, gloo) are in tests/test_refine_cli.py.
"""

import pytest
import torch

from gmmrefine import distributed


@pytest.mark.parametrize("n, block, world", [(160, 64, 2), (1000, 64, 3), (7, 4, 4), (0, 16, 2), (100, 1, 7)])
def test_shards_cover_every_row_once_in_whole_blocks(n, block, world):
    shards = [distributed.shard(n, block, r, world) for r in range(world)]
    assert shards[0][0] == 0 and shards[-1][1] == n
    for (_, hi), (lo2, _) in zip(shards, shards[1:]):
        assert hi == lo2  # contiguous, in rank order
    for lo, hi in shards:
        assert lo % block == 0 and (hi % block == 0 or hi == n)
    counts = [-(-(hi - lo) // block) for lo, hi in shards]
    assert max(counts) - min(counts) <= 1
    assert distributed.max_blocks(n, block, world) == max(counts)


def test_launch_environment_of_torchrun_and_srun():
    assert distributed.launch_environment({}) is None
    assert distributed.launch_environment({"RANK": "0", "WORLD_SIZE": "1"}) is None
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.launch_environment(torchrun) == (3, 4, 1, 2)
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "MASTER_ADDR": "node01"}
    assert distributed.launch_environment(srun) == (5, 8, 1, 4)
    # A batch script's own environment (no srun step, no MASTER_ADDR) is one process.
    assert distributed.launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) is None


def test_backend_and_device():
    assert distributed.backend_and_device("cuda", 1, 4) == ("nccl", "cuda:1")
    assert distributed.backend_and_device("cuda:3", 1, 4) == ("nccl", "cuda:3")
    assert distributed.backend_and_device("cpu", 1, 4) == ("gloo", "cpu")


def test_single_process_collectives_are_identities():
    assert not distributed.current().active
    t = torch.arange(4.0)
    distributed.all_reduce_sum_(t)
    assert torch.equal(t, torch.arange(4.0))
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(7) == 7
    assert distributed.shard(10, 4) == (0, 10)


def test_chunks_are_bounded_in_bytes_and_blocks_in_batches():
    from gmmrefine.refine.global_refine import CHUNK_BYTES, block_rows, chunk_rows

    for box in (48, 128, 256, 512):
        block = block_rows(16, box)
        assert block % 16 == 0 and block >= 16
        chunk = chunk_rows(20000, box, block)
        assert chunk % block == 0
        assert chunk * box * box * 4 <= max(CHUNK_BYTES, block * box * box * 4)
    assert block_rows(16, 128) == 64
    assert chunk_rows(20000, 48, 64) <= 20000


def test_projection_in_one_piece_as_on_cuda(monkeypatch):
    """On CUDA the torch projector takes all Gaussians at once, on the CPU in chunks: run CUDA's branch
    on the CPU (the torch path, chunk = all) and require the same values, gradients, shapes and dtypes.
    The torch path is forced (GMMREFINE_KERNELS=torch) and its calls counted: with the compiled
    library built, the fused C kernel would otherwise run both times."""
    from gmmrefine import native
    from gmmrefine.gmm import project
    from gmmrefine.gmm.model import GaussianMixture
    from gmmrefine.gmm.project import fourier_band, project_gmm

    monkeypatch.setenv("GMMREFINE_KERNELS", "torch")
    calls = {"torch": 0, "fused": 0}
    separable, fused = project._SeparableProjection.apply, native.project_fused_forward
    monkeypatch.setattr(project._SeparableProjection, "apply",
                        lambda *a: calls.__setitem__("torch", calls["torch"] + 1) or separable(*a))
    monkeypatch.setattr(native, "project_fused_forward",
                        lambda *a: calls.__setitem__("fused", calls["fused"] + 1) or fused(*a))

    g = torch.Generator().manual_seed(0)
    n, b = 2500, 16
    gmm = GaussianMixture(torch.randn(n, 3, generator=g) * 12, torch.rand(n, generator=g) + 0.5,
                          torch.rand(n, generator=g) + 1.0)
    band = fourier_band(128, 1.5, 40.0, 4.0)
    rot = torch.linalg.qr(torch.randn(b, 3, 3, generator=g))[0]
    rot = rot * torch.sign(torch.det(rot))[:, None, None]

    weight = torch.randn(b, band.n_pixels, dtype=torch.complex64, generator=g)

    def run():
        t = torch.full((b, 2), 0.3, requires_grad=True)
        proj = project_gmm(gmm, rot, t, band)
        (grad,) = torch.autograd.grad((proj * weight).real.sum(), t)
        return proj.detach(), grad

    chunked, g_chunked = run()
    assert n > max(project._MIN_CHUNK, project._CHUNK_FLOATS // (b * 4 * (band.k_max + 1)))  # CPU: chunks
    monkeypatch.setattr(project, "_MIN_CHUNK", 10**9)
    whole, g_whole = run()
    assert whole.shape == chunked.shape == (b, band.n_pixels) and whole.dtype == chunked.dtype == torch.complex64
    scale = chunked.abs().max()
    assert float((whole - chunked).abs().max() / scale) < 1e-5
    assert float((g_whole - g_chunked).abs().max() / g_chunked.abs().max()) < 1e-4
    assert calls == {"torch": 2, "fused": 0}


def test_bad_batch_is_refused_before_anything_is_written(tmp_path, capsys):
    from gmmrefine.cli.main import main

    for bad in ("zero", "0", "-3"):
        assert main(["refine", "--particles", str(tmp_path / "x.star"), "--out", str(tmp_path / "job"),
                     "--batch", bad]) == 2
        assert "--batch: expected 'auto' or an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "job").exists()
