"""jaxgpt.train.program: the trainer, jaxgpt.aot and the throughput benchmark build one program. The reference is
the trainer itself: its opened run lowers and compiles to the same HLO as the program aot reports on."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from helpers import REPO

from jaxgpt import aot
from jaxgpt import sharding as sh
from jaxgpt.train import config as train_config
from jaxgpt.train.program import Trainable, build_program
from jaxgpt.train.run import open_run


def tiny(tmp_path, pydoc_char_dir, **model):
    c = train_config.load_config_file(str(REPO / "configs" / "tiny.py"))
    c.data.dir = str(pydoc_char_dir)
    c.model.vocab_size = 128  # fixed, so that aot (which has no data) builds the same model
    c.model.update(**model)
    c.grad_accum = 2
    return c


def without_locations(hlo: str) -> str:
    """Compiled HLO text less its source locations (the call sites that traced it differ)."""
    hlo = re.sub(r", metadata=\{[^}]*\}", "", hlo)
    return re.sub(r"\nFileNames\n.*?\n\n\n", "\n", hlo, flags=re.S)


def hlo_of(program, args) -> tuple[str, str]:
    with sh.activation_mesh(program.mesh):
        lowered = program.train_step.lower(*args)
        return lowered.as_text(), without_locations(lowered.compile().as_text())


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_aot_report_compiles_the_hlo_the_trainer_runs(tmp_path, pydoc_char_dir, scan_layers):
    c = tiny(tmp_path, pydoc_char_dir, scan_layers=scan_layers)
    run = open_run(c, tmp_path / "wd")
    try:
        batch = run.data.place(run.data.host(0))
        trainer_lowered, trainer_compiled = hlo_of(run.program, (run.state, batch, run.dropout_rng, run.frozen))
    finally:
        run.mngr.close()
    program = aot.train_program(c, jax.devices()[:1], batch_per_chip=c.batch_size)
    aot_lowered, aot_compiled = hlo_of(program, program.abstract_args())
    assert run.program.layout.stacked == scan_layers == program.layout.stacked
    assert aot_lowered == trainer_lowered
    assert aot_compiled == trainer_compiled


def test_a_scanned_program_holds_the_blocks_stacked_and_saves_them_unrolled():
    from jaxgpt.nn.config import GPTConfig

    cfg = GPTConfig.preset("tiny", n_layer=3, scan_layers=True)
    p = train_config.parts(train_config.base_config())
    program = build_program(cfg, p.optim, p.mesh, grad_accum=1, batch_rows=4)
    assert program.layout.stacked and program.batch_shape == (1, 4, cfg.block_size)
    stacked = program.state.params["h"]["attn"]["c_attn"]["kernel"]
    assert stacked.shape == (3, cfg.n_embd, 3 * cfg.n_embd)
    saved = jax.tree_util.tree_structure(program.saved_shardings.state.params)
    assert {k for k in program.saved_shardings.state.params} >= {"h_0", "h_1", "h_2"}, saved


def test_a_custom_split_keeps_its_frozen_params_beside_the_state():
    from jaxgpt.nn.config import GPTConfig

    cfg = GPTConfig.preset("tiny")
    p = train_config.parts(train_config.base_config())

    def split(params):  # train the embeddings only
        return {"wte": params["wte"]}, {k: v for k, v in params.items() if k != "wte"}

    def combine(trainable, frozen):
        return {**frozen, **trainable}

    program = build_program(cfg, p.optim, p.mesh, grad_accum=1, batch_rows=2,
                            trainable=Trainable(split, combine))
    assert set(program.state.params) == {"wte"} and "wte" not in program.frozen
    state, (x, _), rng, frozen = program.abstract_args()
    assert x.shape == (1, 2, cfg.block_size) and x.dtype == np.int32 and set(frozen) == set(program.frozen)
