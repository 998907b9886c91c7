"""`distillguard kserve-proxy`: registered through the entry point group, refuses bad configs by name."""

from __future__ import annotations

import pytest

from defense.cli import build_parser, main


def test_the_command_is_registered():
    args = build_parser().parse_args(["kserve-proxy", "--config", "a.yaml", "--proxy-config", "b.yaml",
                                      "--listen", "127.0.0.1:0", "--metrics-port", "off"])
    assert args.proxy_config == "b.yaml" and args.listen == ["127.0.0.1:0"] and args.metrics_port is None


def test_missing_and_bad_configs_exit_2_naming_the_problem(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISTILLGUARD_CONFIG", raising=False)
    assert main(["kserve-proxy", "--proxy-config", str(tmp_path / "k.yaml")]) == 2
    assert "--config" in capsys.readouterr().err
    proxy = tmp_path / "k.yaml"
    proxy.write_text("models: {mlp: {strip: [logits]}}\nlisten: [nowhere]\n")
    assert main(["kserve-proxy", "--config", str(tmp_path / "d.yaml"), "--proxy-config", str(proxy)]) == 2
    err = capsys.readouterr().err
    assert str(proxy) in err and "listen address 'nowhere'" in err


@pytest.mark.parametrize("port", ["-1", "70000", "x"])
def test_bad_metrics_ports_are_refused(port, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["kserve-proxy", "--proxy-config", "k.yaml", "--metrics-port", port])
