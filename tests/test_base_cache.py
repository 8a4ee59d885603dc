"""The base-model cache (fslora_min/pretrain.py): keyed by what changes the weights' bits,
sealed by a SHA-256, and rebuilt, with a message, when damaged."""

import torch

from fslora_min.experiment import preset
from fslora_min.pretrain import load_or_pretrain
from fslora_min.sealed import HEADER


def test_a_flipped_byte_in_the_cache_is_detected_and_the_base_rebuilt(capsys, tmp_path):
    model, data, pretrain = preset("tiny")[:3]
    base, path = load_or_pretrain(model, data, pretrain, cache_dir=tmp_path, progress=False)
    raw = bytearray(path.read_bytes())
    raw[HEADER + (len(raw) - HEADER) // 2] ^= 0x01  # one bit, inside the weights
    path.write_bytes(bytes(raw))
    rebuilt, again = load_or_pretrain(model, data, pretrain, cache_dir=tmp_path, progress=False)
    err = capsys.readouterr().err
    assert again == path
    assert f"{path} is corrupted or tampered with: SHA-256 mismatch" in err
    assert "pretraining the base model again" in err
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                 rebuilt.state_dict().values()))
    load_or_pretrain(model, data, pretrain, cache_dir=tmp_path, progress=False)
    assert capsys.readouterr().err == ""  # the rebuilt file is whole again


def test_bases_pretrained_at_other_thread_counts_are_cached_apart(tmp_path):
    model, data, pretrain = preset("tiny")[:3]
    threads = torch.get_num_threads()
    try:
        paths = []
        for n in (1, 2):
            torch.set_num_threads(n)
            paths.append(load_or_pretrain(model, data, pretrain, cache_dir=tmp_path,
                                          progress=False)[1])
    finally:
        torch.set_num_threads(threads)
    assert paths[0] != paths[1] and all(p.is_file() for p in paths)
