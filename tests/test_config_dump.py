"""Config dumps: evaluated from their syntax tree (uploader/parsers/config_eval.py), the settings read off them
(config_settings.py), and where a launch's config is found, its log.json header read once (config_source.py,
log_header.py)."""
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

from uploader import discovery
from uploader.parsers import config_eval, config_source, env_info, log_header
from uploader.parsers.config_eval import ConfigDump, ConfigParseError, evaluate_config
from uploader.parsers.config_settings import (
    RunConfig,
    checkpoint_interval,
    evaluation_interval,
    load_text,
    log_interval,
    optimizer_momentum,
    parse_text,
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


# -- the dump grammar --------------------------------------------------------------------------------
def test_constants_and_order() -> None:
    dump = evaluate_config("b = 1\na = 'x'\nc = 2.5\nd = True\ne = None\nf = False\ng = -1\nh = -0.5\n")
    values = {"b": 1, "a": "x", "c": 2.5, "d": True, "e": None, "f": False, "g": -1, "h": -0.5}
    assert dump == ConfigDump(values=values, skipped={})
    assert list(dump.values) == ["b", "a", "c", "d", "e", "f", "g", "h"]


def test_displays_become_json_shapes() -> None:
    values = _values("a = [1, (2, 3)]\nb = (1, [2])\nc = {'k': (1, 2), 3: None, 'a.b': -1}\ne = ()\n")
    assert values == {"a": [1, [2, 3]], "b": [1, [2]], "c": {"k": [1, 2], 3: None, "a.b": -1}, "e": []}
    assert "unhashable dict key" in _skipped("d = {(1,): 2}\n")["d"]


def test_dict_and_range_calls() -> None:
    values = _values("opt = dict(type='SGD', lr=0.02, nested=dict(a=[1]))\nempty = dict()\ngpu_ids = range(0, 4)\n")
    assert values == {"opt": {"type": "SGD", "lr": 0.02, "nested": {"a": [1]}}, "empty": {}, "gpu_ids": [0, 1, 2, 3]}
    assert _values("a = range(3)\nb = range(1, 7, 2)\n") == {"a": [0, 1, 2], "b": [1, 3, 5]}
    skipped = _skipped("a = dict(x=1, x=2)\nb = range('a')\nc = range(1000000000)\nd = range(1, 2, 0)\n")
    assert "repeated keyword" in skipped["a"] and "range too long" in skipped["c"]
    assert set(skipped) == {"a", "b", "c", "d"}


def test_reassignment_keeps_first_position_and_latest_value() -> None:
    assert list(_values("a = 1\nb = 2\na = 3\n").items()) == [("a", 3), ("b", 2)]


def test_private_names_are_not_reported() -> None:
    assert evaluate_config("_base_ = ['../_base_/models/retinanet.py']\nlr = 0.01\n") == ConfigDump({"lr": 0.01}, {})


# -- what dumps never contain: skipped with the line, never executed ----------------------------------
@pytest.mark.parametrize(
    "expression",
    ["1 + 2", "-(2 + 3)", "+3", "'a' * 3", "base", "inf", "-inf", "f'{x}'", "{1, 2}", "{**base}",
     "dict(base, lr=0.1)", "dict(**base)", "os.sep", "{1: 2}[1]", "1 < 2", "not True", "1 if a else 2", "b'x'",
     "...", "1j", "[*[1]]"],
)
def test_expressions_outside_the_grammar_skip_only_their_name(expression: str) -> None:
    dump = evaluate_config(f"base = dict(lr=1)\nx = {expression}\ny = 2\n")
    assert dump.values == {"base": {"lr": 1}, "y": 2}  # no code ran: the other lines stand
    assert dump.skipped["x"].startswith("line 2: `") and "is not evaluated" in dump.skipped["x"]


@pytest.mark.parametrize(
    "code",
    ["import os", "from m import a as b", "print(base)", "base['lr'] = 2", "base.update(lr=2)", "x = base.copy()",
     "x = (z := 3)", "x = lambda: 1", "x = [i for i in [1]]", "x = len([1])", "x = float('inf')", "x = unknown.a + 1",
     "x, y = 1, 2", "x = y = 1", "x: int = 1", "x += 1", "del x", "globals()['base'] = 2", "exec('base = 2')",
     "if True:\n    x = 1", "for i in [1]:\n    pass", "def f():\n    return 1", "class C:\n    x = 1",
     "from m import *"],
)
def test_code_makes_every_earlier_name_unknown(code: str) -> None:
    """Code can change any name (`globals()`, `exec`), so no earlier value is trusted; later literals are."""
    dump = evaluate_config(f"from m import unknown\nx = 0\nbase = dict(lr=1)\n{code}\nlater = {{'a': [1]}}\n")
    assert dump.values == {"later": {"a": [1]}}
    assert dump.skipped["base"].startswith("line 4: may be changed by `")


def test_a_skipped_name_rebound_to_a_literal_is_known_again() -> None:
    assert evaluate_config("x = f()\nx = inf\nx = 3\ny = 1\n").values == {"x": 3, "y": 1}


def test_names_bound_by_code_are_reported() -> None:
    source = "import os\nfrom a.b import c as d\ndef f():\n    inner = 1\nclass C:\n    x = 1\nfor i in []:\n    pass\n"
    skipped = _skipped(source)
    assert set(skipped) == {"os", "d", "f", "C", "i"}  # function and class bodies have their own scope
    assert skipped["os"] == "line 7: may be changed by `for i in []:`, which is not evaluated"
    assert skipped["i"] == "line 7: set by `for i in []:`, which is not evaluated"
    assert _skipped("x = 1\ndef f():\n    return 1\n") == {
        "x": "line 2: may be changed by `def f():`, which is not evaluated",
        "f": "line 2: set by `def f():`, which is not evaluated",
    }


def test_shadowed_builtins_are_not_trusted() -> None:
    assert "(call)" not in _skipped("def dict(**kw):\n    return kw\nx = dict(a=1)\n")["x"]
    assert set(_skipped("def dict(**kw):\n    return kw\nx = dict(a=1)\n")) == {"dict", "x"}
    assert "may not be Python's own" in _skipped("from mylib import range\nx = range(3)\n")["x"]
    assert "may not be Python's own" in _skipped("globals()['dict'] = list\nx = dict(a=1)\n")["x"]
    assert "may not be Python's own" in _skipped("dict = 1\nx = dict(a=1)\n")["x"]
    assert "may not be Python's own" in _skipped("from m import *\nx = dict(a=1)\n")["x"]
    assert _values("import os\nx = dict(a=1)\n") == {"x": {"a": 1}}  # an import binds only what it names


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
    assert set(dump.skipped) == {"os", "f", "g", "h", "boom", "value", "k", "l", "m"}


def test_module_never_uses_exec_eval_or_imports_at_runtime() -> None:
    tree = ast.parse(Path(config_eval.__file__).read_text(encoding="utf-8"))
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"exec", "eval", "compile", "__import__"}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"importlib", "runpy", "builtins"}


def test_degenerate_inputs_are_bounded() -> None:
    deep = "a = " + "[" * 150 + "]" * 150 + "\nb = 2\n"  # as deep as Python's parser allows
    assert evaluate_config(deep).values["b"] == 2
    long_chain = "a = " + " + ".join(["1"] * 2_000) + "\nb = 2\n"  # parses, but deeper than Python's stack
    dump = evaluate_config(long_chain)
    assert dump.values == {"b": 2} and "not evaluated" in dump.skipped["a"]
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
visualizer = dict(
    type='DetLocalVisualizer',
    vis_backends=[dict(type='LocalVisBackend'), dict(type='WandbVisBackend', init_kwargs=dict(project='mmdet3'))],
    name='visualizer')
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


# -- finding a launch's config; the log.json header read once -------------------------------------------
BALLOON = REAL_LOGS / "liweiwp__OpenMMLabCamp/mmdet/balloon"


def _launch(work_dir: Path, header: dict[str, Any], dump: str | None = None) -> discovery.FoundLog:
    """A mmdet 2.x work_dir with one launch: its log.json (header and one train line), maybe a dump beside it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(header), json.dumps({"mode": "train", "epoch": 1, "iter": 1, "lr": 0.01, "loss": 1.0})]
    (work_dir / "20230208_011526.log.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if dump is not None:
        (work_dir / header["exp_name"]).write_text(dump, encoding="utf-8")
    (found,) = discovery.scan(work_dir).logs
    return found


def _real_header(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return json.loads(fh.readline())


def test_header_is_read_once_and_serves_config_and_environment(tmp_path: Path) -> None:
    real = _real_header(BALLOON / "20230208_011526.log.json")
    header = log_header.read(_launch(tmp_path / "balloon", real))
    assert (header.exp_name, header.config, header.env_info) == (real["exp_name"], real["config"], real["env_info"])
    assert env_info.for_log(header, None) == env_info.parse_block(real["env_info"])
    assert env_info.for_log(header, None)["MMDetection"].startswith("2.")
    found = _launch(tmp_path / "balloon", real)
    lookup = config_source.find(found, header)
    assert lookup.error is None and lookup.config == parse_text(real["config"], real["exp_name"])
    assert config_source.for_log(found) == lookup.config


def test_dump_beside_the_log_wins_over_the_header(tmp_path: Path) -> None:
    real = _real_header(BALLOON / "20230208_011526.log.json")
    dumped = (BALLOON / "mask_rcnn_r50_caffe_fpn_mstrain-poly_1x_balloon.py").read_text(encoding="utf-8")
    header = {**real, "exp_name": "cfg.py", "config": "log_config = dict(interval=7)\n"}
    lookup = config_source.find(found := _launch(tmp_path, header, dumped), log_header.read(found))
    assert lookup.error is None and lookup.config is not None
    assert (lookup.config.name, lookup.config.text, lookup.config.log_interval) == ("cfg.py", dumped, 50)


def test_a_config_that_is_not_python_is_told_apart_from_no_config(tmp_path: Path) -> None:
    header = {"exp_name": "cfg.py", "config": "log_config = dict(interval=7)\n"}
    found = _launch(tmp_path / "broken_dump", header, "a = 1\nb = dict(\n")
    lookup = config_source.find(found, log_header.read(found))
    assert lookup.config is not None and lookup.config.log_interval == 7  # the header's copy still serves
    assert isinstance(lookup.error, ConfigParseError) and (lookup.error.filename, lookup.error.lineno) == ("cfg.py", 2)
    assert lookup.error_in == found.work_dir / "cfg.py"
    found = _launch(tmp_path / "broken_header", {"exp_name": "cfg.py", "config": "x = (\n"})
    lookup = config_source.find(found, log_header.read(found))
    assert lookup.config is None and str(lookup.error) == "cfg.py, line 1: '(' was never closed"
    assert lookup.error_in == found.path
    assert config_source.for_log(found) is None  # what ingest takes, as before
    found = _launch(tmp_path / "none", {"seed": 1})
    assert config_source.find(found, log_header.read(found)) == config_source.ConfigLookup(None, None)


def test_long_header_is_read_whole_and_unsafe_files_not_at_all(tmp_path: Path) -> None:
    config = "".join(f"v{i} = dict(a={i})\n" for i in range(20_000))  # ~350 KB, several reads
    found = _launch(tmp_path / "long", {"exp_name": "long.py", "config": config})
    header = log_header.read(found)
    assert header.config == config
    assert len(config_source.find(found, header).config.values) == 20_000  # type: ignore[union-attr]
    link = tmp_path / "link" / "20230208_011526.log.json"
    link.parent.mkdir()
    link.symlink_to(found.path)
    linked = discovery.FoundLog(link, link.parent, found.format, "20230208_011526", None, None)
    assert log_header.read(linked) == log_header.LogHeader()  # never through a symlink (tail.open_regular)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "20230208_011526.log.json").write_bytes(b"")
    empty = discovery.FoundLog(tmp_path / "empty" / "20230208_011526.log.json", tmp_path / "empty", found.format,
                               "20230208_011526", None, None)
    assert log_header.read(empty) == log_header.LogHeader()
