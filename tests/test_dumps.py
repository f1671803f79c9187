import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import atom_compile
from atom_compile import AtomConfig


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


CONFIG = AtomConfig(group_size=32, n_outliers=32)
FILES = ["00_input.py", "01_rotate_kv_heads.py", "02_outlier_analysis.py", "03_reorder_channels.py",
         "04_insert_quant_nodes.py", "05_fuse_quant_into_norm.py", "06_fuse_dequant_into_gemm.py",
         "07_fuse_sibling_gemms.py", "08_merge_sliced_head_ops.py", "09_quantize_kv_cache.py", "10_lowered.py"]


def test_one_file_per_pass_with_header_graph_and_meta(tiny, tmp_path):
    dump = tmp_path / "dump"
    atom_compile.compile(tiny, torch.randint(0, 64, (2, 16)), CONFIG, dump_dir=dump, progress=False)
    for layer in ("layer_00", "layer_01"):
        assert sorted(p.name for p in (dump / layer).iterdir()) == FILES
    text = {f: (dump / "layer_00" / f).read_text() for f in FILES}
    assert "# pass: ReorderChannels" in text["03_reorder_channels.py"]
    assert "# modified: True" in text["03_reorder_channels.py"]
    assert re.search(r"# nodes: \d+ -> \d+ \(\+1 aten.index_select\)", text["03_reorder_channels.py"])
    assert "# modified: False" in text["02_outlier_analysis.py"]
    assert "atom.channel_order" in text["02_outlier_analysis.py"]
    assert "torch.ops.atom.rms_norm_quant" in text["05_fuse_quant_into_norm.py"]
    assert "torch.ops.atom.rms_norm_quant" not in text["04_insert_quant_nodes.py"]
    assert "torch.ops.atom.quant_linear" in text["06_fuse_dequant_into_gemm.py"]
    assert "(+5 aten.slice, -3 atom.quant_linear)" in text["07_fuse_sibling_gemms.py"]
    assert "k_cache: \"u8[" in text["09_quantize_kv_cache.py"]
    lowered = text["10_lowered.py"]
    assert "Kernel table" in lowered and "reference:quant_linear_reference" in lowered
    assert "torch.ops.atom" not in lowered.split('"""')[0]  # every atom op is bound
    # weights are elided: no tensor values in the graph code
    assert "tensor([" not in text["04_insert_quant_nodes.py"].split('"""')[0]


def test_dump_layers_and_rewipe(tiny, tmp_path):
    dump = tmp_path / "dump"
    atom_compile.compile(tiny, torch.randint(0, 64, (2, 16)), CONFIG, dump_dir=dump, dump_layers={1}, progress=False)
    assert [p.name for p in dump.iterdir()] == ["layer_01"]
    atom_compile.compile(tiny, None, "fp", dump_dir=dump, progress=False)  # a previous dump is wiped
    assert sorted(p.name for p in dump.iterdir()) == ["layer_00", "layer_01"]


def test_refuses_to_wipe_foreign_files(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to wipe.*notes.txt"):
        atom_compile.compile(tiny, None, "fp", dump_dir=tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
