"""Tensor-parallel shards (2 real processes, gloo) reproduce the unsharded target exactly."""

import pytest
import torch
import torch.multiprocessing as mp

from dovetail.errors import UserError
from dovetail.protocol.collectives import LocalCollective, shm_collective_bytes
from dovetail.protocol.shm import ShmArena
from dovetail.models.tp import check_shardable, load_shard
from tiny_models import VOCAB, described, hf_greedy, perturbed, tiny_config, tiny_model

PROMPT = [5, 17, 33, 2, 90, 41, 7]


def _shard_worker(rank, world, init_file, model_dir, draft_dir, out, segment):
    import torch.distributed as dist

    from dovetail.protocol.collectives import ShmCollective, TorchDistributedCollective
    from test_greedy_identity import make_engine
    from dovetail.models.tree import TreeShape

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        collective = ShmCollective(segment, world, rank, slot_bytes=4096) if segment else TorchDistributedCollective()
        shard = load_shard(described(model_dir), collective)
        draft = torch.load(draft_dir, weights_only=False)
        tokens = make_engine(shard, draft, TreeShape(8, 4, 2)).generate(PROMPT, 30).token_ids
        with torch.inference_mode():
            logits = shard(torch.tensor([PROMPT])).logits[0]
        # a plain array, pickled by value: a torch tensor goes through a file descriptor that dies
        # with this process, which may exit before the parent has read it
        out.put((rank, tokens, logits.numpy().copy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch,collective", [("qwen2", "gloo"), ("llama", "gloo"), ("qwen2", "shm")])
def test_two_shards_match_the_full_model(tmp_path, arch, collective):
    target = tiny_model(arch, seed=21, num_key_value_heads=2, pad_token_id=90)  # padding row outside shard 0
    target.save_pretrained(tmp_path / "model")
    draft = perturbed(target, 0.05)
    torch.save(draft, tmp_path / "draft.pt")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    arena = ShmArena(shm_collective_bytes(2, slot_bytes=4096)) if collective == "shm" else None  # small slots: chunking
    procs = [ctx.Process(target=_shard_worker, args=(r, 2, tmp_path / "init", tmp_path / "model", tmp_path / "draft.pt",
                                                     out, arena.name if arena else None)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (tok, torch.from_numpy(logits))) for r, tok, logits in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    if arena:
        arena.close()
    with torch.inference_mode():
        full_logits = target(torch.tensor([PROMPT])).logits[0]
    expected = hf_greedy(target, PROMPT, 30, eos=1)
    for rank in (0, 1):
        tokens, logits = results[rank]
        torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)
        assert tokens == expected


def test_one_shard_is_the_whole_model(tmp_path):
    target = tiny_model("qwen2", seed=22)
    target.save_pretrained(tmp_path)
    shard = load_shard(described(tmp_path), LocalCollective())
    with torch.inference_mode():
        torch.testing.assert_close(shard(torch.tensor([PROMPT])).logits, target(torch.tensor([PROMPT])).logits,
                                   atol=1e-5, rtol=1e-5)


def test_uneven_sharding_is_refused():
    with pytest.raises(UserError, match=r"KV heads \(2\)"):
        check_shardable(tiny_config("qwen2", kv_heads=2, num_attention_heads=6), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slice_reader_matches_safetensors(tmp_path, dtype):
    from safetensors.torch import save_file

    from dovetail.models.slices import SliceReader

    tensors = {"a": torch.randn(37, 21).to(dtype), "b": torch.randn(5).to(dtype)}
    save_file(tensors, tmp_path / "x.safetensors")
    reader = SliceReader(tmp_path / "x.safetensors")
    reader.CHUNK_BYTES = 64  # force several row blocks for the column slice
    assert torch.equal(reader.read("a"), tensors["a"]) and torch.equal(reader.read("b"), tensors["b"])
    assert torch.equal(reader.read("a", 0, 3, 11), tensors["a"][3:11])
    assert torch.equal(reader.read("a", 1, 4, 19), tensors["a"][:, 4:19])
    reader.close()
