"""uploader.parsers.config_dump: evaluating dumped OpenMMLab configs from their syntax tree; settings read off them."""
from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader.parsers import config_dump
from uploader.parsers.config_dump import (
    ConfigDump,
    ConfigParseError,
    RunConfig,
    checkpoint_interval,
    evaluate_config,
    evaluation_interval,
    load_text,
    log_interval,
    optimizer_momentum,
    runner_by_epoch,
    wandb_hook_options,
)

REAL_LOGS = Path("/work/shared/real_logs")


def _real_configs() -> list[Any]:
    """Every dumped `.py` and every `config` string of a `.log.json` header in the real corpus."""
    params = []
    for path in sorted(REAL_LOGS.rglob("*.py")):
        name = str(path.relative_to(REAL_LOGS))
        params.append(pytest.param(path.read_text(encoding="utf-8"), name, id=name))
    for path in sorted(REAL_LOGS.rglob("*.log.json")):
        with path.open(encoding="utf-8") as fh:
            header = json.loads(fh.readline())
        if "config" in header:
            name = f"{path.relative_to(REAL_LOGS)}#config"
            params.append(pytest.param(header["config"], name, id=name))
    return params


REAL_CONFIGS = _real_configs()


def _real(relative: str) -> str:
    if relative.endswith("#config"):
        with (REAL_LOGS / relative.removesuffix("#config")).open(encoding="utf-8") as fh:
            return json.loads(fh.readline())["config"]
    return (REAL_LOGS / relative).read_text(encoding="utf-8")


def _json_shaped(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_shaped(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_shaped(v) for v in value)
    return value is None or isinstance(value, (str, int, float))


def _values(source: str) -> dict[str, Any]:
    return evaluate_config(source).values


def _skipped(source: str) -> dict[str, str]:
    return evaluate_config(source).skipped


def _config(source: str, name: str = "config.py") -> RunConfig:
    config = load_text(source, name)
    assert config is not None
    return config


# -- the real corpus ---------------------------------------------------------------------------------
def test_corpus_is_present() -> None:
    # 8 dumped .py files and 15 log.json headers with a config (one header, DGFormer ADE20k, has none).
    assert len(REAL_CONFIGS) == 23


@pytest.mark.parametrize(("text", "name"), REAL_CONFIGS)
def test_real_config_evaluates_completely(text: str, name: str) -> None:
    dump = evaluate_config(text, name)
    assert dump.skipped == {}
    assert isinstance(dump.values["model"], dict)
    # Dumps put each top-level variable at column 0 as `name = ...`; all of them, in file order.
    assigned = list(dict.fromkeys(re.findall(r"^([A-Za-z]\w*) = ", text, flags=re.M)))
    assert list(dump.values) == assigned
    assert _json_shaped(dump.values)  # W&B config is JSON: no tuples, ranges or sets left


@pytest.mark.parametrize(("text", "name"), REAL_CONFIGS)
def test_real_config_runner_type_matches_text(text: str, name: str) -> None:
    cfg = evaluate_config(text, name).values
    runner = re.search(r"^runner = dict\(type='(\w+)'", text, flags=re.M)
    loop = re.search(r"^train_cfg = dict\(\s*type='(\w+)'", text, flags=re.M)
    written = (runner or loop).group(1)  # type: ignore[union-attr]
    assert written in {"EpochBasedRunner", "IterBasedRunner", "EpochBasedTrainLoop", "IterBasedTrainLoop"}
    assert runner_by_epoch(cfg) is written.startswith("Epoch")


@pytest.mark.parametrize(("text", "name"), REAL_CONFIGS)
def test_real_config_settings_match_text(text: str, name: str) -> None:
    config = _config(text, name)
    momentum = re.search(r"type='SGD',[^)]*?momentum=([\d.]+)", text)  # Adam(W) configs here set no betas
    assert optimizer_momentum(config.values) == (float(momentum.group(1)) if momentum else None)
    assert config.momentum == (float(momentum.group(1)) if momentum else 0.9)  # torch's Adam(W) default
    logger = re.search(
        r"^log_config = dict\(\s*interval=(\d+)|logger=dict\(type='LoggerHook', interval=(\d+)", text, re.M
    )
    assert config.log_interval == int(logger.group(1) or logger.group(2))  # type: ignore[union-attr]
    assert wandb_hook_options(config.values) is None  # nobody in the corpus used W&B
    assert config.hook_options == {}
    assert config.text == text and config.name == name


def test_dump_beside_log_and_log_header_agree() -> None:
    """mmdet 2.x writes the same merged config to <name>.py and to the log.json header."""
    py = "ISCLab-Bistu__DGFormer/detection/work_dirs/mask_rcnn_dgformer_fpn_1x_coco/mask_rcnn_dgformer_fpn_1x_coco.py"
    header = "ISCLab-Bistu__DGFormer/detection/work_dirs/mask_rcnn_dgformer_fpn_1x_coco/20230722_002453.log.json#config"
    assert _values(_real(py)) == _values(_real(header))


def test_mmseg_log_header_has_fields_the_dump_lacks() -> None:
    """mmseg 0.x tools/train.py changes cfg after dumping it; the log.json header is the later version."""
    folder = "liweiwp__OpenMMLabCamp/mmseg/voc2012/"
    dumped = _values(_real(folder + "pspnet_r50-d8_512x512_20k_voc12.py"))
    logged = _values(_real(folder + "20230211_190345.log.json#config"))
    assert set(logged) - set(dumped) == {"device", "seed"}
    assert logged["device"] == "cuda" and logged["seed"] == 1674394082
    assert "pretrained" not in dumped["model"]["backbone"]
    assert logged["model"]["backbone"]["pretrained"] == "open-mmlab://resnet50_v1c"


def test_mmseg_iter_based_pspnet() -> None:
    config = _config(_real("liweiwp__OpenMMLabCamp/mmseg/voc2012/pspnet_r50-d8_512x512_20k_voc12.py"), "pspnet.py")
    assert config.by_epoch is False
    assert config.momentum == 0.9
    assert checkpoint_interval(config.values) == 2000
    assert evaluation_interval(config.values) == 2000 and config.eval_interval == 2000
    assert config.log_interval == 50
    assert config.values["runner"] == {"type": "IterBasedRunner", "max_iters": 20000}
    assert config.values["crop_size"] == [512, 512]
    assert config.values["optimizer"] == {"type": "SGD", "lr": 0.005, "momentum": 0.9, "weight_decay": 0.0005}
    assert config.values["workflow"] == [["train", 1]]
    assert config.values["norm_cfg"] == {"type": "SyncBN", "requires_grad": True}


def test_mmdet2_mask_rcnn_with_adamw_and_range_gpu_ids() -> None:
    text = _real(
        "ISCLab-Bistu__DGFormer/detection/work_dirs/mask_rcnn_dgformer_fpn_1x_coco/mask_rcnn_dgformer_fpn_1x_coco.py"
    )
    config = _config(text, "mask_rcnn.py")
    assert "gpu_ids = range(0, 4)" in text  # mmdet's train.py sets cfg.gpu_ids = range(world_size)
    assert config.values["gpu_ids"] == [0, 1, 2, 3]
    assert optimizer_momentum(config.values) is None  # AdamW without betas in the config
    assert config.momentum == 0.9  # ... so the hook logged torch's default
    assert config.by_epoch is True
    assert config.values["runner"]["max_epochs"] == 12
    assert evaluation_interval(config.values) is None  # evaluation = dict(metric=['bbox', 'segm'])
    assert config.eval_interval == 1  # ... which mmdet 2.x runs every epoch
    assert config.values["evaluation"] == {"metric": ["bbox", "segm"]}
    assert checkpoint_interval(config.values) == 1
    rpn = config.values["model"]["train_cfg"]["rpn"]
    assert rpn["assigner"]["ignore_iof_thr"] == -1 and rpn["allowed_border"] == -1


def test_mmdet2_balloon_values() -> None:
    values = _values(_real("liweiwp__OpenMMLabCamp/mmdet/balloon/mask_rcnn_r50_caffe_fpn_mstrain-poly_1x_balloon.py"))
    assert values["classes"] == ["balloon"]
    assert values["optimizer"]["momentum"] == 0.9
    assert values["log_config"] == {"interval": 50, "hooks": [{"type": "TextLoggerHook"}]}
    assert values["auto_scale_lr"] == {"enable": False, "base_batch_size": 16}
    assert values["resume_from"] is None


def test_cornernet_adam_without_betas() -> None:
    cfg = _values(
        _real(
            "masati91__ELTD/work_dirs/cornernet_hourglass104_mstest_10x5_210e_coco/"
            "cornernet_hourglass104_mstest_10x5_210e_coco.py"
        )
    )
    assert cfg["optimizer"] == {"type": "Adam", "lr": 0.0005}
    assert optimizer_momentum(cfg) is None
    assert cfg["runner"] == {"type": "EpochBasedRunner", "max_epochs": 210}
    assert cfg["gpu_ids"] == [5]


def test_mmengine_rtmdet_dump() -> None:
    config = _config(_real("Rogerlv51__OpenMMlab_HW/lab_third_assignment/train_log/vis_data/config.py"))
    assert config.by_epoch is True
    assert checkpoint_interval(config.values) == 10
    assert evaluation_interval(config.values) == 10 and config.eval_interval == 10
    assert config.log_interval == 5
    assert optimizer_momentum(config.values) is None  # optim_wrapper.optimizer is AdamW without betas
    assert config.momentum == 0.9  # torch's AdamW default
    assert config.values["train_cfg"]["dynamic_intervals"] == [[280, 1]]
    assert config.values["img_scales"] == [[640, 640], [320, 320], [960, 960]]
    tta = config.values["tta_pipeline"][1]["transforms"]
    assert tta[2] == [{"type": "Pad", "size": [960, 960], "pad_val": {"img": [114, 114, 114]}}]
    assert config.values["param_scheduler"][0]["start_factor"] == 1e-05


def test_mmengine_rtmdet_ear_dump_with_uppercase_constants() -> None:
    values = _values(
        _real(
            "superegg-M__OpenMMLabCamp/task1_MMPose/mmdetection/work_dirs/rtmdet_tiny_ear/"
            "20230605_131231/vis_data/config.py"
        )
    )
    assert values["metainfo"] == {"classes": ["ear"]}
    assert (values["NUM_CLASSES"], values["MAX_EPOCHS"], values["VAL_INTERVAL"]) == (1, 200, 5)
    assert evaluation_interval(values) == 5 and log_interval(values) == 1
    assert values["train_cfg"]["dynamic_intervals"] == [[180, 1]]


def test_mmseg1_iter_based_dump() -> None:
    values = _values(
        _real("lyc686__OpenMMlab_AI_2023.2/code/Task_03/VOC2012语义分割/log/20230213_115425/vis_data/config.py")
    )
    assert runner_by_epoch(values) is False
    assert optimizer_momentum(values) == 0.9
    assert checkpoint_interval(values) == 1000
    assert evaluation_interval(values) == 1000
    assert log_interval(values) == 500


# -- supported constructs ----------------------------------------------------------------------------
def test_constants_and_order() -> None:
    dump = evaluate_config("b = 1\na = 'x'\nc = 2.5\nd = True\ne = None\nf = False\n")
    assert dump == ConfigDump(values={"b": 1, "a": "x", "c": 2.5, "d": True, "e": None, "f": False}, skipped={})
    assert list(dump.values) == ["b", "a", "c", "d", "e", "f"]


def test_arithmetic() -> None:
    values = _values("a = -1\nb = 1/3\nc = 2**10\nd = 7 // 2\ne = 7 % 3\nf = 0.1 * 4 - 1\ng = +3\nh = -(2 + 3)\n")
    assert values == {"a": -1, "b": 1 / 3, "c": 1024, "d": 3, "e": 1, "f": 0.1 * 4 - 1, "g": 3, "h": -5}


def test_arithmetic_that_python_rejects_is_skipped() -> None:
    skipped = _skipped("a = 1 / 0\nb = 'x' - 'y'\nc = 2 ** 100000\nd = 'a' * 3\ne = 1 << 2\nf = (-8) ** (1 / 3)\n")
    assert "ZeroDivisionError" in skipped["a"]
    assert "operator not supported" in skipped["b"]
    assert "integer too large" in skipped["c"]
    assert "operator not supported" in skipped["d"]  # only str + str is evaluated for strings
    assert "operator not supported" in skipped["e"]
    assert "(complex result)" in skipped["f"]


def test_string_and_sequence_concatenation() -> None:
    values = _values("root = 'data/'\nann = root + 'train.json'\npipe = [1] + [2]\nt = (1,) + (2,)\n")
    assert values == {"root": "data/", "ann": "data/train.json", "pipe": [1, 2], "t": [1, 2]}
    assert "operator not supported" in _skipped("x = [1] + (2,)\n")["x"]


def test_fstrings_of_known_names() -> None:
    values = _values("name = 'retina'\nepochs = 12\nwork_dir = f'./work_dirs/{name}_{epochs}e'\nr = f'{name!r}'\n")
    assert values["work_dir"] == "./work_dirs/retina_12e"
    assert values["r"] == "'retina'"
    skipped = _skipped("lr = 0.02\nx = f'{lr:.0e}'\ny = f'{missing}'\n")
    assert "f-string format spec" in skipped["x"]
    assert "`missing` is not defined" in skipped["y"]


def test_displays_become_json_shapes() -> None:
    values = _values(
        "a = [1, (2, 3)]\nb = (1, [2])\nc = {'k': (1, 2), 3: None}\nd = {3, 1, 2}\ne = ()\nf = {'b', 'a'}\n"
    )
    assert values == {
        "a": [1, [2, 3]],
        "b": [1, [2]],
        "c": {"k": [1, 2], 3: None},
        "d": [1, 2, 3],
        "e": [],
        "f": ["a", "b"],
    }
    assert "unhashable" in _skipped("s = {[1]}\n")["s"]
    assert "unhashable dict key" in _skipped("d = {[1]: 2}\n")["d"]


def test_dict_calls_and_merges() -> None:
    source = (
        "base = dict(type='SGD', lr=0.02)\n"
        "opt = dict(momentum=0.9, **base)\n"
        "opt2 = {**base, 'lr': 0.01}\n"
        "opt3 = dict(base, lr=0.1)\n"
        "empty = dict()\n"
    )
    values = _values(source)
    assert values["opt"] == {"momentum": 0.9, "type": "SGD", "lr": 0.02}
    assert values["opt2"] == {"type": "SGD", "lr": 0.01}
    assert values["opt3"] == {"type": "SGD", "lr": 0.1}
    assert values["empty"] == {}
    assert values["base"] == {"type": "SGD", "lr": 0.02}  # merging never changes the source dict
    skipped = _skipped("a = dict(x=1)\nb = dict(x=2, **a)\nc = dict(**[1])\nd = {**[1]}\ne = dict([('k', 1)])\n")
    assert "repeated keyword" in skipped["b"]
    assert set(skipped) == {"b", "c", "d", "e"}


def test_references_to_earlier_names() -> None:
    source = "norm_cfg = dict(type='BN')\nmodel = dict(backbone=dict(norm_cfg=norm_cfg), neck=[norm_cfg])\n"
    assert _values(source)["model"] == {"backbone": {"norm_cfg": {"type": "BN"}}, "neck": [{"type": "BN"}]}
    assert "`later` is not defined earlier" in _skipped("x = later\nlater = 1\n")["x"]


def test_float_and_range_builtins() -> None:
    values = _values(
        "a = float('inf')\nb = float('-inf')\nc = float('nan')\nd = float(3)\ne = range(3)\nf = range(1, 7, 2)\n"
    )
    assert values["a"] == math.inf and values["b"] == -math.inf and math.isnan(values["c"])
    assert values["d"] == 3.0 and values["e"] == [0, 1, 2] and values["f"] == [1, 3, 5]
    skipped = _skipped("a = float('x')\nb = range('a')\nc = range(10**9)\nd = float(x=1)\n")
    assert set(skipped) == {"a", "b", "c", "d"}
    assert "range too long" in skipped["c"]


def test_shadowed_builtins_are_not_trusted() -> None:
    skipped = _skipped("def dict(**kw):\n    return kw\nx = dict(a=1)\n")
    assert set(skipped) == {"dict", "x"}
    assert "(call)" in skipped["x"]
    assert "(call)" in _skipped("from mylib import float\nx = float('1')\n")["x"]


def test_tuple_unpacking_and_chained_assignment() -> None:
    values = _values("a, b = 1, 2\n[c, d] = [3, (4,)]\ne = f = 5\na, b = b, a\n")
    assert values == {"a": 2, "b": 1, "c": 3, "d": [4], "e": 5, "f": 5}
    skipped = _skipped("a, b = 1, 2, 3\nc, d = 'xy'\n")
    assert set(skipped) == {"a", "b", "c", "d"} and "cannot unpack" in skipped["a"]
    assert set(_skipped("a, *b = [1, 2]\n")) == {"a", "b"}


def test_annotated_and_augmented_assignment() -> None:
    assert _values("x: int = 3\ny: int\nx += 2\ns = 'a'\ns += 'b'\n") == {"x": 5, "s": "ab"}


def test_reassignment_keeps_first_position_and_latest_state() -> None:
    dump = evaluate_config("a = 1\nb = open('f')\nc = 3\na = open('g')\nb = 2\n")
    assert list(dump.values) == ["b", "c"] and dump.values["b"] == 2
    assert list(dump.skipped) == ["a"] and "open('g')" in dump.skipped["a"]
    assert list(_values("a = 1\nb = 2\na = 3\n")) == ["a", "b"]


def test_private_names_are_usable_but_not_reported() -> None:
    dump = evaluate_config("_base_ = ['../_base_/models/retinanet.py']\n_lr = 0.01\nlr = _lr * 2\n__x = f(1)\n")
    assert dump == ConfigDump(values={"lr": 0.02}, skipped={})


def test_imports_are_ignored_but_explain_dependent_skips() -> None:
    dump = evaluate_config("import os\nfrom mmdet.models import RetinaNet as R\nmodel = dict(type=R)\nx = 1\n")
    assert dump.values == {"x": 1}
    assert dump.skipped == {"model": "line 3: name `R` comes from an import"}


def test_dependent_of_skipped_name_is_skipped() -> None:
    skipped = _skipped("a = compute()\nb = dict(x=a)\n")
    assert skipped["b"] == "line 2: uses `a`, which was skipped"


def test_del_removes_a_name() -> None:
    assert _values("tmp = 1\nx = tmp + 1\ndel tmp\n") == {"x": 2}


# -- unsupported constructs: skipped, never executed --------------------------------------------------
def test_calls_attribute_access_lambda_comprehension_are_skipped() -> None:
    source = (
        "import os\n"
        "a = os.path.join('x', 'y')\n"
        "b = len([1])\n"
        "c = lambda x: x\n"
        "d = [i for i in range(3)]\n"
        "e = {1: 2}[1]\n"
        "f = 1 if True else 2\n"
        "g = 1 < 2\n"
        "h = b'bytes'\n"
        "i = not True\n"
        "j = [*[1]]\n"
        "k = ...\n"
    )
    skipped = _skipped(source)
    assert skipped["a"] == "line 2: `os.path.join('x', 'y')` is not evaluated (call)"
    assert skipped["b"] == "line 3: `len([1])` is not evaluated (call)"
    assert "(lambda)" in skipped["c"]
    assert "(comprehension)" in skipped["d"]
    assert "(subscript)" in skipped["e"]
    assert "(conditional expression)" in skipped["f"]
    assert "(comparison)" in skipped["g"]
    assert "(bytes constant)" in skipped["h"]
    assert "(unary operator)" in skipped["i"]
    assert "(unpacking)" in skipped["j"]
    assert "(ellipsis constant)" in skipped["k"]
    assert "(attribute access)" in _skipped("import os\nsep = os.sep\n")["sep"]


def test_function_and_class_definitions_are_skipped() -> None:
    skipped = _skipped("def f():\n    return 1\nclass C:\n    x = 1\nasync def g():\n    pass\n")
    assert set(skipped) == {"f", "C", "g"}  # the class body's `x` is not top-level
    assert skipped["f"] == "line 1: set by `def f():`, which is not evaluated"


def test_unevaluated_statements_invalidate_what_they_may_change() -> None:
    source = (
        "model = dict(a=1)\n"
        "pipeline = [1]\n"
        "opt = dict(lr=1)\n"
        "untouched = 1\n"
        "model['b'] = 2\n"
        "pipeline.append(2)\n"
        "if True:\n    flag = 1\n"
        "for i in [1, 2]:\n    pass\n"
        "x = opt.copy()\n"
        "y = (z := 3)\n"
        "print([k for k in [untouched]])\n"
    )
    dump = evaluate_config(source)
    assert dump.values == {"untouched": 1}
    assert dump.skipped["model"] == "line 5: may be modified by `model['b'] = 2`, which is not evaluated"
    assert "pipeline.append(2)" in dump.skipped["pipeline"]
    assert "line 7: set by `if True:`" in dump.skipped["flag"]
    assert "line 9" in dump.skipped["i"]
    assert "x = opt.copy()" in dump.skipped["opt"]
    assert set(dump.skipped) == {"model", "pipeline", "opt", "flag", "i", "x", "y", "z"}


def test_nothing_is_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    source = (
        "import os\n"
        f"os.makedirs({str(marker / 'a')!r})\n"
        f"f = open({str(marker)!r}, 'w')\n"
        f"g = __import__('pathlib').Path({str(marker)!r}).touch()\n"
        f"h = dict(x=open({str(marker)!r}, 'w'))\n"
        f"def boom():\n    open({str(marker)!r}, 'w')\n"
        "value = boom()\n"
        f"k = (lambda: open({str(marker)!r}, 'w'))()\n"
        f'l = f"{{open({str(marker)!r}, \'w\')}}"\n'
        f"m = [open({str(marker)!r}, 'w') for _ in range(1)]\n"
        "ok = 1\n"
    )
    dump = evaluate_config(source)
    assert not marker.exists()
    assert dump.values == {"ok": 1}
    assert set(dump.skipped) == {"f", "g", "h", "boom", "value", "k", "l", "m"}


def test_module_never_uses_exec_eval_or_imports_at_runtime() -> None:
    tree = ast.parse(Path(config_dump.__file__).read_text(encoding="utf-8"))
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"exec", "eval", "compile", "__import__"}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"importlib", "runpy", "builtins"}


def test_degenerate_inputs_are_bounded() -> None:
    growth = "a0 = [1, 2, 3, 4, 5, 6, 7, 8]\n" + "".join(f"a{i + 1} = [a{i}, a{i}, a{i}, a{i}]\n" for i in range(12))
    dump = evaluate_config(growth)  # shared in memory, but 4**12 times a0 once expanded to JSON
    assert dump.skipped["a9"] == "line 10: value is too large"
    assert list(dump.values) == [f"a{i}" for i in range(9)]
    deep = "a = " + "[" * 150 + "]" * 150 + "\n"
    assert _skipped(deep)["a"] == "line 1: value is nested more than 100 levels deep"
    long_chain = "a = " + " + ".join(["1"] * 2_000) + "\nb = 2\n"  # parses, but deeper than Python's stack
    dump = evaluate_config(long_chain)
    assert dump.values == {"b": 2} and dump.skipped["a"] == "line 1: expression is nested too deeply"
    with pytest.raises(ConfigParseError):  # too deep even for Python's own compiler
        evaluate_config("a = " + " + ".join(["1"] * 50_000))


def test_syntax_error_raises_with_filename_and_line() -> None:
    with pytest.raises(ConfigParseError, match=r"work_dir/cfg\.py, line 2:") as info:
        evaluate_config("a = 1\nb = dict(\n", "work_dir/cfg.py")
    assert info.value.lineno == 2 and info.value.filename == "work_dir/cfg.py"
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigParseError, match="<config>"):
        evaluate_config("a = 1\x00")


# -- property: any literal structure round-trips -------------------------------------------------------
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
_literals = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


def _as_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    return value


@settings(max_examples=200, deadline=None)
@given(_literals)
def test_literal_round_trip(value: Any) -> None:
    assert evaluate_config(f"x = {value!r}\n").values == {"x": _as_json(value)}


# -- extractors ---------------------------------------------------------------------------------------
MMDET_DOCS_WANDB = """
log_config = dict(
    interval=50,
    hooks=[
        dict(type='TextLoggerHook'),
        dict(type='MMDetWandbHook',
             init_kwargs={'project': 'mmdetection'},
             interval=10,
             log_checkpoint=True,
             log_checkpoint_metadata=True,
             num_eval_images=100,
             bbox_score_thr=0.3)
    ])
"""


def test_mmdet_wandb_hook_from_docs() -> None:
    config = _config(MMDET_DOCS_WANDB, "docs.py")
    assert config.hook_options == wandb_hook_options(config.values) == {
        "type": "MMDetWandbHook",
        "init_kwargs": {"project": "mmdetection"},
        "interval": 10,
        "log_checkpoint": True,
        "log_checkpoint_metadata": True,
        "num_eval_images": 100,
        "bbox_score_thr": 0.3,
    }
    assert config.log_interval == 50


@pytest.mark.parametrize("hook_type", ["MMDetWandbHook", "mmdet.MMDetWandbHook", "WandbLoggerHook", "MMSegWandbHook"])
def test_wandb_hook_interval_defaults_to_log_config_interval(hook_type: str) -> None:
    hooks = [{"type": "TextLoggerHook"}, {"type": hook_type, "init_kwargs": {"project": "p"}}]
    cfg = {"log_config": {"interval": 20, "hooks": hooks}}
    options = wandb_hook_options(cfg)
    assert options == {"type": hook_type, "init_kwargs": {"project": "p"}, "interval": 20}
    options["init_kwargs"]["project"] = "changed"  # a copy: the evaluated config stays as read
    assert cfg["log_config"]["hooks"][1]["init_kwargs"] == {"project": "p"}


def test_wandb_hook_absent_or_odd_shapes() -> None:
    assert wandb_hook_options({}) is None
    assert wandb_hook_options({"log_config": {"interval": 50, "hooks": [{"type": "TextLoggerHook"}]}}) is None
    assert wandb_hook_options({"log_config": "odd", "visualizer": ["odd"]}) is None
    assert wandb_hook_options({"log_config": {"hooks": [None, 3, {"type": 5}, {"type": "WandbLoggerHook"}]}}) == {
        "type": "WandbLoggerHook"
    }  # no log_config.interval: nothing to default to
    assert wandb_hook_options({"log_config": {"hooks": {"type": "MMDetWandbHook"}, "interval": 5}}) == {
        "type": "MMDetWandbHook",
        "interval": 5,
    }


def test_mmengine_wandb_vis_backend() -> None:
    source = """
vis_backends = [dict(type='LocalVisBackend'), dict(type='WandbVisBackend', init_kwargs=dict(project='mmdet3'))]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
"""
    options = _config(source).hook_options
    assert options == {"type": "WandbVisBackend", "init_kwargs": {"project": "mmdet3"}}
    single = {"visualizer": {"vis_backends": {"type": "mmengine.WandbVisBackend"}}}
    assert wandb_hook_options(single) == {"type": "mmengine.WandbVisBackend"}


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"runner": {"type": "EpochBasedRunner", "max_epochs": 12}}, True),
        ({"runner": {"type": "IterBasedRunner", "max_iters": 100}}, False),
        ({"runner": {"type": "mmcv.EpochBasedRunnerAmp"}}, True),
        ({"runner": {"type": "MyRunner", "max_iters": 100}}, False),
        ({"total_epochs": 12}, True),
        ({"runner": {"type": "IterBasedRunner"}, "total_epochs": 12}, False),
        ({"train_cfg": {"type": "EpochBasedTrainLoop", "max_epochs": 12}}, True),
        ({"train_cfg": {"type": "IterBasedTrainLoop", "max_iters": 100}}, False),
        ({"train_cfg": {"by_epoch": False, "max_iters": 100}}, False),
        ({"train_cfg": {"by_epoch": True}}, True),
        ({"train_cfg": {"rpn": {}, "rcnn": {}}}, None),  # mmdet 2.x legacy model train_cfg
        ({"runner": "odd", "train_cfg": [1]}, None),
        ({}, None),
    ],
)
def test_runner_by_epoch(cfg: dict[str, Any], expected: bool | None) -> None:
    assert runner_by_epoch(cfg) is expected


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"optimizer": {"type": "SGD", "momentum": 0.9}}, 0.9),
        ({"optimizer": {"type": "Adam", "betas": [0.8, 0.999]}}, 0.8),
        ({"optimizer": {"type": "SGD", "momentum": 0}}, 0.0),
        ({"optim_wrapper": {"optimizer": {"type": "AdamW", "betas": (0.9, 0.999)}}}, 0.9),
        ({"optim_wrapper": {"optimizer": {"momentum": 0.95}}, "optimizer": {"momentum": 0.5}}, 0.95),
        ({"optimizer": {"type": "AdamW", "lr": 0.001}}, None),
        ({"optimizer": {"momentum": True, "betas": []}}, None),
        ({"optimizer": "SGD"}, None),
        ({}, None),
    ],
)
def test_optimizer_momentum(cfg: dict[str, Any], expected: float | None) -> None:
    assert optimizer_momentum(cfg) == expected


def test_intervals_mmdet2_and_mmengine() -> None:
    mmdet2 = {"checkpoint_config": {"interval": 2}, "evaluation": {"interval": 3}, "log_config": {"interval": 50}}
    assert (checkpoint_interval(mmdet2), evaluation_interval(mmdet2), log_interval(mmdet2)) == (2, 3, 50)
    mmengine = {
        "default_hooks": {"checkpoint": {"interval": 4}, "logger": {"interval": 10}},
        "train_cfg": {"val_interval": 5},
    }
    assert (checkpoint_interval(mmengine), evaluation_interval(mmengine), log_interval(mmengine)) == (4, 5, 10)
    odd = {
        "checkpoint_config": {"interval": "1"},
        "evaluation": None,
        "log_config": {"interval": True},
        "default_hooks": 3,
    }
    assert (checkpoint_interval(odd), evaluation_interval(odd), log_interval(odd)) == (None, None, None)
    integral = {"checkpoint_config": {"interval": 2.0}, "evaluation": {"interval": 1.5}, "log_config": {"interval": 5}}
    assert (checkpoint_interval(integral), evaluation_interval(integral), log_interval(integral)) == (2, None, 5)
    assert (checkpoint_interval({}), evaluation_interval({}), log_interval({})) == (None, None, None)


def test_run_config_is_frozen() -> None:
    config = load_text("runner = dict(type='EpochBasedRunner')\n", "x.py")
    assert isinstance(config, RunConfig)
    with pytest.raises(AttributeError):
        config.by_epoch = False  # type: ignore[misc]
