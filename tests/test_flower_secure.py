"""Strangers stay out: the Flower app behind TLS and SuperNode authentication, on 127.0.0.1.

A SuperLink is started with TLS (a CA and server certificate made here by
fedsrd_kernels.flower.security) and ``--enable-supernode-auth``; the operator
registers SuperNode public keys through the Control API (``flwr supernode
register``). A registered SuperNode that trusts the CA comes online and
trains a FedSRD round; a SuperNode with an unregistered key, one with no key,
one trusting another CA and a plaintext one are all refused, and none of them
ever shows up in the SuperLink's node list.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'flwr>=1.42')")
pytest.importorskip("peft")

from cryptography import x509  # noqa: E402  (a flwr dependency)
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key  # noqa: E402

from fedsrd_kernels.errors import ConfigError  # noqa: E402
from fedsrd_kernels.flower.security import SuperNodeKeys, TLSFiles, make_supernode_keys, make_tls_certificates  # noqa: E402
from tests.flower_helpers import (  # noqa: E402
    BIN_DIR,
    Processes,
    flower_env,
    free_ports,
    wait_for_port,
    write_app,
    write_jsonl,
)

pytestmark = pytest.mark.flower

RUN = {"method": "fedsrd", "rounds": 1, "model": "tiny", "rank": 4, "local_steps": 1, "batch_size": 2,
       "seq_len": 32, "seed": 0, "min-nodes": 1}
REFUSAL_TIMEOUT = 45.0  # a refused SuperNode exits within seconds; one still running after this was let in


# --- the helper on its own -------------------------------------------------------------------------------------


def test_tls_certificates_name_the_hosts_and_keep_the_key_private(tmp_path):
    files = make_tls_certificates(tmp_path / "tls", ["127.0.0.1", "link.example.org", "::1"])
    assert files.ca_keyfile is None and not (tmp_path / "tls" / "ca.key").exists()
    assert stat.S_IMODE(files.keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate(files.ca_certfile.read_bytes())
    cert = x509.load_pem_x509_certificate(files.certfile.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(files.keyfile.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        make_tls_certificates(tmp_path / "tls")
    again = make_tls_certificates(tmp_path / "tls", keep_ca_key=True, overwrite=True)
    assert stat.S_IMODE(again.ca_keyfile.stat().st_mode) == 0o600
    for bad in ([], ["bad host!"], ["-x.org"], [""], "a..b"):
        with pytest.raises(ConfigError):
            make_tls_certificates(tmp_path / "other", bad)
    with pytest.raises(ConfigError):
        make_tls_certificates(tmp_path / "other", days=0)


def test_supernode_keys_are_what_flower_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    keys = make_supernode_keys(tmp_path, "alpha")
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(keys.public_key)  # as `flwr supernode register` loads it
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        make_supernode_keys(tmp_path, "alpha")
    for bad in ("../alpha", "", ".hidden", "a b"):
        with pytest.raises(ConfigError):
            make_supernode_keys(tmp_path, bad)


# --- a secured deployment ----------------------------------------------------------------------------------------


@dataclass
class SecureLink:
    """A running TLS SuperLink with SuperNode authentication, and the means to poke at it."""

    root: Path
    port: int
    env: dict[str, str]
    procs: Processes
    tls: TLSFiles
    rogue_tls: TLSFiles
    keys: dict[str, SuperNodeKeys]
    registered: dict[str, int] = field(default_factory=dict)  # SuperNode name -> node ID

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN_DIR / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def flwr_json(self, *args: str) -> dict:
        done = self.flwr(*args, "--format", "json")
        try:
            return json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            pytest.fail(f"flwr {' '.join(args)} gave no JSON (rc={done.returncode}):\n{done.stdout}\n{done.stderr}")

    def nodes(self, connection: str = "secure") -> dict[int, str]:
        """Node ID -> status ('registered', 'online', 'offline', ...) as the Control API lists them."""
        listing = self.flwr_json("supernode", "list", connection, "--verbose")
        assert listing.get("success"), listing
        return {int(n["node-id"]): n["status"] for n in listing["nodes"]}

    def supernode(self, name: str, *args: str) -> subprocess.Popen:
        (runtime_port,) = free_ports(1)  # each SuperNode serves its own Runtime API to its ClientApps
        return self.procs.start(name, "flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
                                "--host", "127.0.0.1", "--port", str(runtime_port), *args)

    def refused(self, name: str, proc: subprocess.Popen) -> str:
        """Wait for a SuperNode that must be turned away; its log."""
        try:
            proc.wait(timeout=REFUSAL_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SuperNode {name!r} was let in: still running after {REFUSAL_TIMEOUT} s\n"
                        f"{self.procs.log(name)}\nnodes: {self.nodes()}")
        log = self.procs.log(name)
        assert proc.returncode != 0, f"SuperNode {name!r} exited with 0:\n{log}"
        assert "Failed to initialize the connection to the SuperLink" in log, log
        return log

    def assert_only_registered_nodes(self) -> None:
        assert set(self.nodes()) == set(self.registered.values())


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    if shutil.which("flower-superlink", path=str(BIN_DIR)) is None:
        pytest.skip("flower-superlink is not installed next to this Python")
    root = tmp_path_factory.mktemp("secure-federation")
    tls = make_tls_certificates(root / "superlink-tls")  # 127.0.0.1 and localhost
    rogue_tls = make_tls_certificates(root / "rogue-tls")  # same names, another CA
    keys = {name: make_supernode_keys(root / "supernode-keys", name) for name in ("alpha", "carol", "stranger")}
    (port,) = free_ports(1)  # one HTTPS port serves the Fleet, Control and Runtime APIs
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "secure"\n\n'
        f'[superlink.secure]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{tls.ca_certfile}"\n\n'
        f'[superlink.plaintext]\naddress = "127.0.0.1:{port}"\ninsecure = true\n\n'
        f'[superlink.rogue]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{rogue_tls.ca_certfile}"\n')
    env = flower_env(home)
    procs = Processes(root, env)
    try:
        superlink = procs.start("superlink", "flower-superlink", *tls.superlink_args(), "--enable-supernode-auth",
                                "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port))
        try:
            wait_for_port(port, superlink)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n{procs.log('superlink')}")
        secure = SecureLink(root, port, env, procs, tls, rogue_tls, keys)
        for name in ("alpha", "carol"):  # "stranger" is never registered
            done = secure.flwr_json("supernode", "register", str(keys[name].public_key), "secure")
            assert done.get("success"), done
            secure.registered[name] = int(done["node-id"])
        assert secure.nodes() == {node_id: "registered" for node_id in secure.registered.values()}
        yield secure
    finally:
        procs.stop_all()


@pytest.mark.slow  # the `link` fixture: a TLS SuperLink with SuperNode auth; refused nodes wait out their timeouts
def test_plaintext_and_untrusting_clients_cannot_talk_to_the_superlink(link):
    plaintext_node = link.supernode("plaintext-node", "--insecure", "--max-retries", "1")
    rogue_node = link.supernode("rogue-ca-node", *link.rogue_tls.supernode_args(),
                                *link.keys["carol"].supernode_args())  # a registered key, the wrong CA
    for connection in ("plaintext", "rogue"):
        listing = link.flwr_json("supernode", "list", connection)
        assert listing.get("success") is False, (connection, listing)
    assert "CERTIFICATE_VERIFY_FAILED" in link.refused("rogue-ca-node", rogue_node)
    link.refused("plaintext-node", plaintext_node)
    assert link.nodes()[link.registered["carol"]] == "registered"  # carol's key never got in
    link.assert_only_registered_nodes()


@pytest.mark.slow
def test_unknown_supernodes_are_refused(link):
    from flwr.supercore.error import ApiErrorCode

    stranger = link.supernode("stranger", *link.tls.supernode_args(), *link.keys["stranger"].supernode_args())
    keyless = link.supernode("keyless", *link.tls.supernode_args())  # would register itself were auth off
    stranger_log = link.refused("stranger", stranger)
    assert f"[code: {ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED.value}]" in stranger_log, stranger_log
    keyless_log = link.refused("keyless", keyless)
    assert f"[code: {ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED.value}]" in keyless_log, keyless_log
    link.assert_only_registered_nodes()


@pytest.mark.slow
def test_registered_supernode_joins_and_trains(link):
    data = write_jsonl(link.root)
    out_dir = link.root / "flower-out"
    app_dir = write_app(link.root / "app", {**RUN, "out-dir": str(out_dir)})
    alpha_id = link.registered["alpha"]
    link.supernode("alpha", *link.tls.supernode_args(), *link.keys["alpha"].supernode_args(),
                   "--node-config", f"name='alpha' jsonl='{data['alpha']}'")
    deadline = time.monotonic() + 60
    while link.nodes()[alpha_id] != "online":
        if time.monotonic() > deadline:
            pytest.fail(f"alpha never came online\n{link.procs.all_logs()}")
        time.sleep(0.5)
    run = link.flwr("run", str(app_dir), "secure", "--stream", timeout=240)
    rounds_file = out_dir / "rounds.jsonl"
    if not rounds_file.exists():
        pytest.fail(f"no result; flwr run rc={run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n"
                    + link.procs.all_logs())
    rounds = [json.loads(line) for line in rounds_file.read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in rounds] == [(1, 1)]
    assert (out_dir / "global_adapter.safetensors").stat().st_size > 0
    assert link.nodes() == {alpha_id: "online", link.registered["carol"]: "registered"}
