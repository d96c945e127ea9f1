"""--config FILE (YAML or JSON) holding any option, command-line options overriding it, --print-config
printing the resolved options, and the manifest storing them."""

import json

import pytest
import yaml

from conftest import FACTS_FORGET, FACTS_RETAIN, save_model_dir, write_jsonl
from unlearn_fast.cli import main
from unlearn_fast.io.artifacts import read_manifest


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_file_options_are_defaults_and_the_command_line_overrides_them(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: some/model\nforget: f.jsonl\nretain: r.jsonl\nout: layers\n"
                      "lr: 1e-3\nbatch-size: 4\nblocks: top:2\nlambda: 0.5\ngradient_checkpointing: true\n")
    code, out, err = run(capsys, "unlearn", "--config", config, "--print-config", "--batch-size", "16")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["model"] == "some/model" and resolved["out"] == "layers"  # required options, from the file
    assert resolved["lr"] == 1e-3  # YAML reads 1e-3 as a string: converted as on the command line
    assert resolved["batch_size"] == 16  # the command line wins
    assert resolved["blocks"] == 2 and resolved["lam"] == 0.5 and resolved["gradient_checkpointing"] is True
    assert resolved["epochs"] == 3 and resolved["accumulate"] == 1  # defaults: the full config
    assert "config" not in resolved and "print_config" not in resolved

    # the printed config is a config file: the same options again
    again = tmp_path / "again.yaml"
    again.write_text(out)
    code, out2, err = run(capsys, "unlearn", "--config", again, "--print-config")
    assert code == 0, err
    assert yaml.safe_load(out2) == resolved


def test_json_config_and_lists(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": "smollm2", "blocks": [0, 5], "batch_size": 2, "max_length": 64}))
    code, out, err = run(capsys, "plan", "--config", config, "--print-config")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["blocks"] == [0, 5] and resolved["batch_size"] == 2 and resolved["max_length"] == 64


@pytest.mark.parametrize("content,needle", [
    ("bogus_option: 1\n", "unknown option 'bogus_option'"),
    ("schedule: sometimes\n", "is not one of mixed, alternate"),
    ("gradient_checkpointing: maybe\n", "a flag takes true or false"),
    ("batch_size: many\n", "cannot read 'many'"),
    ("- a list\n", "expected a mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_config_files_are_usage_errors(tmp_path, capsys, content, needle):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main(["unlearn", "--config", str(config), "--print-config"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--config", str(tmp_path / "absent.yaml")])
    assert "cannot read it" in capsys.readouterr().err


def test_the_manifest_stores_the_resolved_config(tmp_path, capsys):
    save_model_dir("llama", tmp_path / "model")
    write_jsonl(tmp_path / "forget.jsonl", FACTS_FORGET)
    write_jsonl(tmp_path / "retain.jsonl", FACTS_RETAIN)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tmp_path / "model"), "forget": str(tmp_path / "forget.jsonl"),
        "retain": str(tmp_path / "retain.jsonl"), "out": str(tmp_path / "layers"), "rank": 4, "max_steps": 2,
        "no_eval": True, "no_progress": True, "batch_size": 1, "accumulate": 2}))
    code, out, err = run(capsys, "unlearn", "--config", config, "--seed", "3")
    assert code == 0, err
    manifest = read_manifest(tmp_path / "layers")
    stored = manifest["run_config"]
    assert stored["rank"] == 4 and stored["accumulate"] == 2 and stored["seed"] == 3
    assert stored["model"] == str(tmp_path / "model")
    assert manifest["training"]["accumulate"] == 2 and manifest["training"]["batch_size"] == 1
