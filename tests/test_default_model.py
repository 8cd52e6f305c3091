"""The real default model (all-MiniLM-L6-v2 as IBertModel), calibrated on movie-review text."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compile_capturing

SEQ = 32
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def default_artifact(tmp_path_factory):
    from ibert_tvm.compile import CompileOptions, default_calibration_texts

    opt = CompileOptions(model="default", target="host", batch=1, seq_len=SEQ, out=tmp_path_factory.mktemp("default") / "art",
                         calib_texts=default_calibration_texts(64), progress=False)
    return compile_capturing(opt)


@pytest.fixture(scope="session")
def sentences(default_artifact):
    """8 real sentences not used for calibration, each short enough for the compiled length."""
    from ibert_tvm.data import movie_sentences
    from ibert_tvm.runner import Runner

    tok = Runner(default_artifact[0]).tokenizer
    rows = [text for _, text in movie_sentences()[7::331]]
    return [t for t in rows if len(tok.encode(t).ids) <= SEQ][:8]


def test_default_model_bit_exact(default_artifact, sentences):
    from ibert_tvm import reference
    from ibert_tvm.runner import Runner

    path, program = default_artifact
    assert len(sentences) == 8 and (program.hidden, len(program.layers)) == (384, 6)
    r = Runner(path)
    ids, mask, _ = r.encode(sentences).values()
    got, want = r.run_integer(ids, mask), reference.run(program, ids, mask)
    for name in program.outputs:
        differing = int((got[name] != want[name]).sum())
        print(f"{name}: {differing} of {got[name].size} elements differ")
        assert differing == 0


def test_default_model_close_to_fp32(default_artifact, sentences):
    from ibert_tvm.fp32 import fp32_embeddings
    from ibert_tvm.runner import Runner

    ours = Runner(default_artifact[0]).embed(sentences)
    ref = fp32_embeddings("default", sentences, SEQ)
    cos = (ours * ref).sum(1)
    sim_int, sim_fp = ours @ ours.T, ref @ ref.T
    off = ~np.eye(len(sentences), dtype=bool)
    print(f"cosine(int8, fp32) per sentence: {np.round(cos, 4).tolist()}; mean {cos.mean():.4f}, min {cos.min():.4f}")
    print(f"pairwise similarity max |int8 - fp32|: {np.abs(sim_int - sim_fp)[off].max():.4f}")
    assert cos.mean() > 0.9
