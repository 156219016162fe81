"""The main job's entry point runs end to end and reports what it promises."""

from fedsrd_kernels.__main__ import main


def test_demo_runs_and_matches_oracle(capsys):
    assert main(["demo", "--rounds", "2", "--clients", "2", "--local-steps", "2", "--compare", "fedavg"]) == 0
    out = capsys.readouterr().out
    assert "== fedsrd:" in out and "== fedavg:" in out and "traffic ratio" in out
    errors = [float(line.split()[7]) for line in out.splitlines() if line.strip()[:1].isdigit() and "e-" in line]
    assert errors and max(errors) < 1e-5


def test_unknown_command_fails():
    assert main(["frobnicate"]) == 2


def test_run_and_compare_keep_their_own_folders(tmp_path, monkeypatch, capsys):
    """`run` and `compare` never share a folder, so neither overwrites the other's summary."""
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(f'{{"text": "note {i}: the ledger balances at {i * 7} units."}}\n' for i in range(24)))
    monkeypatch.chdir(tmp_path)
    small = ["--model", "tiny", "--rounds", "1", "--local-steps", "1", "--batch-size", "2", "--seq-len", "16",
             "--domains", "", "--jsonl", f"notes={data}", "--heldout-examples", "2", "--no-progress"]
    assert main(["run", *small]) == 0
    single = (tmp_path / "runs" / "run" / "fedsrd" / "summary.txt").read_text()
    assert main(["compare", "--methods", "fedavg,fedsrd-e", *small]) == 0
    assert (tmp_path / "runs" / "run" / "fedsrd" / "summary.txt").read_text() == single
    joint = (tmp_path / "runs" / "compare" / "summary.txt").read_text()
    assert "fedavg" in joint and "fedsrd-e" in joint
    assert sorted(p.name for p in (tmp_path / "runs" / "compare").iterdir() if p.is_dir()) == ["fedavg", "fedsrd-e"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["compare", "run"]
    capsys.readouterr()
    for command in ("run", "compare"):
        try:
            main([command, "--help"])
        except SystemExit as exit:
            assert exit.code == 0
        text = capsys.readouterr().out
        assert "fedsrd-e" in text and "ffa-lora" in text and "runs/compare" in text
        assert "0.001 with the L1 rescale, else 0.003" in " ".join(text.split()) and "(default: None)" not in text
