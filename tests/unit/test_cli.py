"""The CLI through click's CliRunner: what needs no root and no kernel."""

from __future__ import annotations

from click.testing import CliRunner

from fastlb.cli import main

CONFIG = """
[[vip]]
address = "198.19.0.100"
port = 80
algorithm = "maglev"
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "198.18.0.12"

[[vip]]
address = "198.19.0.100"
port = 81
algorithm = "wrr"
[[vip.backend]]
address = "198.18.0.11"
weight = 5
[[vip.backend]]
address = "198.18.0.12"
"""


def write(tmp_path, text=CONFIG):
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    return str(path)


def test_help_lists_the_commands():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for cmd in ("attach", "detach", "status", "check", "explain"):
        assert cmd in res.output


def test_check_accepts_a_good_config(tmp_path):
    res = CliRunner().invoke(main, ["check", "-c", write(tmp_path)])
    assert res.exit_code == 0 and "ok (2 VIPs, 4 backends)" in res.output


def test_check_names_the_field_and_line_of_a_bad_one(tmp_path):
    res = CliRunner().invoke(main, ["check", "-c", write(tmp_path, CONFIG.replace("port = 81", "port = 70000"))])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "fastlb.toml:13: vip[1].port:" in lines[0]


def test_check_a_missing_file(tmp_path):
    res = CliRunner().invoke(main, ["check", "-c", str(tmp_path / "nope.toml")])
    assert res.exit_code != 0 and "nope.toml" in res.output


def test_explain_names_a_backend_for_maglev(tmp_path):
    res = CliRunner().invoke(main, ["explain", "-c", write(tmp_path), "--vip", "198.19.0.100:80/tcp",
                                    "--src", "198.18.0.1:40000"])
    assert res.exit_code == 0, res.output
    assert "backend: 198.18.0.1" in res.output and "ring slot" in res.output


def test_explain_json_is_the_same_answer(tmp_path):
    import json
    args = ["explain", "-c", write(tmp_path), "--vip", "198.19.0.100:80", "--src", "198.18.0.1:40000"]
    text = CliRunner().invoke(main, args).output
    data = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert f"backend: {data['backend']}" in text


def test_explain_says_the_cursor_rule_for_wrr(tmp_path):
    res = CliRunner().invoke(main, ["explain", "-c", write(tmp_path), "--vip", "198.19.0.100:81/tcp",
                                    "--src", "198.18.0.1:40000"])
    assert res.exit_code == 0
    assert "cursor" in res.output and "198.18.0.11 198.18.0.11 198.18.0.11 198.18.0.12" in res.output


def test_explain_an_unknown_vip_lists_the_known_ones(tmp_path):
    res = CliRunner().invoke(main, ["explain", "-c", write(tmp_path), "--vip", "198.19.0.100:82/tcp",
                                    "--src", "198.18.0.1:40000"])
    assert res.exit_code == 1 and "198.19.0.100:80/tcp" in res.output


def test_explain_rejects_a_bad_source(tmp_path):
    res = CliRunner().invoke(main, ["explain", "-c", write(tmp_path), "--vip", "198.19.0.100:80/tcp",
                                    "--src", "nonsense"])
    assert res.exit_code == 2 and "ADDR:PORT" in res.output


def test_explain_rejects_a_source_of_the_other_family(tmp_path):
    res = CliRunner().invoke(main, ["explain", "-c", write(tmp_path), "--vip", "198.19.0.100:80/tcp",
                                    "--src", "[2001:db8::1]:40000"])
    assert res.exit_code == 2 and "family" in res.output


FTP = """
[settings]
hash_seed = 3141592653
[[vip]]
address = "198.19.0.100"
{ports}
forwarding = "{forwarding}"
{more}
[[vip.backend]]
address = "198.18.0.11"
"""


def test_check_warns_for_ftp_through_nat_and_for_ftp_without_its_passive_range(tmp_path):
    nat = CliRunner().invoke(main, ["check", "-c", write(tmp_path, FTP.format(ports="port = 21", forwarding="nat",
                                                                              more=""))])
    assert nat.exit_code == 0 and "198.19.0.100:21/tcp: nat forwarding on FTP's port 21" in nat.output
    bare = CliRunner().invoke(main, ["check", "-c", write(tmp_path, FTP.format(ports="port = 21", forwarding="dsr",
                                                                               more=""))])
    assert bare.exit_code == 0 and "without ports = [21" in bare.output
    good = CliRunner().invoke(main, ["check", "-c", write(tmp_path, FTP.format(
        ports='ports = [21, "30000-30100"]', forwarding="dsr", more="persistence = 600"))])
    assert good.exit_code == 0 and "warning" not in good.output
    plain = CliRunner().invoke(main, ["check", "-c", write(tmp_path, "[settings]\nhash_seed = 3141592653\n" + CONFIG)])
    assert "warning" not in plain.output


def test_check_warns_when_hash_seed_is_0_and_not_when_set(tmp_path):
    """With seed 0 anyone can compute where a flow lands and aim a flood at one
    backend (issue 13 item 16): check and attach say so, and how to fix it."""
    res = CliRunner().invoke(main, ["check", "-c", write(tmp_path)])
    assert res.exit_code == 0
    assert "warning" in res.output and "hash_seed" in res.output and "secret" in res.output
    res = CliRunner().invoke(main, ["check", "-c", write(tmp_path, "[settings]\nhash_seed = 3141592653\n" + CONFIG)])
    assert res.exit_code == 0 and "hash_seed" not in res.output


def test_decap_attach_names_a_bad_from_prefix(tmp_path):
    res = CliRunner().invoke(main, ["decap", "attach", "eth0", "--vip", "198.19.0.100", "--from", "198.18.200.1/24"])
    assert res.exit_code != 0 and "--from" in res.output and "198.18.200.1/24" in res.output
