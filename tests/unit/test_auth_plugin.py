"""node/auth.py's plugin loading: ``module:function`` and an entry point of the
``shoal.auth`` group (a distribution found on sys.path, as an installed package is)."""

from __future__ import annotations

import sys

import pytest

from node.auth import load_plugin
from node.config import ConfigError


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    (tmp_path / "acme_login.py").write_text(
        "def authenticate(client_id, username, password, peer, cert):\n"
        "    return username == 'acme'\n"
        "class Service:\n"
        "    def authenticate(self, *a):\n"
        "        return None\n"
        "    def reload(self):\n"
        "        pass\n"
        "service = Service()\n")
    dist = tmp_path / "acme_login-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-login\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[shoal.auth]\nacme = acme_login:authenticate\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("acme_login", None)


def test_an_entry_point_and_a_module_path_load(plugin_path):
    by_name = load_plugin("acme")
    assert by_name.authenticate("c", "acme", b"", "1.2.3.4:5", None) is True
    assert by_name.authenticate("c", "other", b"", "1.2.3.4:5", None) is False
    obj = load_plugin("acme_login:service")
    assert obj.authenticate() is None and callable(obj.reload)


@pytest.mark.parametrize("spec, words", [
    ("nothing-installed", "no entry point"),
    ("acme_login:missing", "cannot be loaded"),
    ("no_such_module_xyz:f", "cannot be loaded"),
])
def test_a_plugin_that_cannot_be_loaded_is_a_config_error(plugin_path, spec, words):
    with pytest.raises(ConfigError, match=words):
        load_plugin(spec)


def test_scram_client_matches_rfc_7677_and_the_server_accepts_it():
    """RFC 7677's example exchange (user "user", password "pencil") for the client side,
    then the server against it."""
    import base64
    from node.scram import ScramServer, client_exchange, scram_entry
    flow = client_exchange("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert next(flow) == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = flow.send(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                      b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    with pytest.raises(StopIteration) as done:
        flow.send(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert done.value.value is True
    entry = scram_entry("pencil", 4096, base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="))
    for password, ok in (("pencil", True), ("pencil!", False)):
        server, flow = ScramServer(), client_exchange("user", password)
        first = server.first(next(flow), {"user": entry}.get)
        verdict = server.final(flow.send(first))
        assert (verdict is not None) == ok and server.user == "user"
        if ok:
            with pytest.raises(StopIteration) as done:
                flow.send(verdict)
            assert done.value.value is True
