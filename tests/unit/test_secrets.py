"""Secrets as a type, the masker, and resolving a pipeline's secrets."""
from __future__ import annotations

import base64
import pickle
import threading
from urllib.parse import quote, quote_plus

import pytest

from runner.stage import Secrets
from runner.errors import InvalidInput, SecretWithheld, StageFailed
from runner.loader import load_pipeline_text
from runner.secrets import Masker, Secret, SecretStore, global_masker


def test_secret_never_shows_itself():
    s = Secret("hunter22")
    assert str(s) == "***"
    assert repr(s) == "Secret(***)"
    assert f"{s}" == "***" and f"{s:>20}" == "***"
    assert "hunter22" not in repr([s, {"k": s}])
    assert s.reveal() == "hunter22"
    assert s == Secret("hunter22") and s != Secret("other")
    with pytest.raises(TypeError):
        pickle.dumps(s)


VALUE = "p@ss w/rd+1="


@pytest.mark.parametrize("shown", [
    VALUE,
    quote(VALUE, safe=""),
    quote_plus(VALUE),
    base64.b64encode(VALUE.encode()).decode(),
    base64.urlsafe_b64encode(VALUE.encode()).decode().rstrip("="),
])
def test_masker_masks_value_and_encoded_forms(shown):
    m = Masker()
    m.add(VALUE)
    assert m.mask(f"login with {shown} now") == "login with *** now"


def test_masker_masks_each_line_of_a_multiline_value():
    key = "-----BEGIN KEY-----\nAAAAB3NzaC1yc2EAAAADAQAB\r\nqwertyuiopasdf\n-----END KEY-----\n"
    m = Masker()
    m.add(key)
    assert m.mask(key) == "***"
    assert m.mask("line: qwertyuiopasdf!") == "line: ***!"
    assert m.mask("got AAAAB3NzaC1yc2EAAAADAQAB") == "got ***"
    assert m.mask('{"key": "' + key.replace("\r\n", "\n").replace("\n", "\\n")[:30]) \
        .count("***") >= 1


def test_masker_masks_json_escaped_form():
    m = Masker()
    m.add('pa"ss\\word')
    assert m.mask('{"password": "pa\\"ss\\\\word"}') == '{"password": "***"}'


def test_masker_longest_first_and_overlaps():
    m = Masker()
    m.add("abcd")
    m.add("abcdefgh")
    assert m.mask("xxabcdefghxx abcd") == "xx***xx ***"


def test_masker_ignores_short_values_with_a_warning():
    warnings: list[str] = []
    m = Masker(on_warning=warnings.append)
    m.add("abc", name="pin")
    m.add("")
    assert m.mask("abc abc") == "abc abc"
    assert warnings == ["secret 'pin' is shorter than 4 characters and is not masked in logs"]
    assert "abc" not in warnings[0].replace("characters", "")


def test_masker_short_value_warning_goes_to_log_by_default(caplog):
    Masker().add("ab", name="pin")
    assert "secret 'pin' is shorter than 4 characters" in caplog.text


def test_masker_regex_characters_are_literal():
    m = Masker()
    m.add("a.b*c(d)")
    assert m.mask("a.b*c(d) axbbbc(d)") == "*** axbbbc(d)"


def test_masker_accepts_secret_objects_and_is_thread_safe():
    m = Masker()
    values = [f"secret-value-{i:03d}" for i in range(200)]

    def add(chunk):
        for v in chunk:
            m.add(Secret(v))

    threads = [threading.Thread(target=add, args=(values[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.mask(" ".join(values)) == " ".join(["***"] * 200)


def test_global_masker_is_one_object():
    assert global_masker() is global_masker()


PIPELINE = """\
name: demo
repository: {url: x, token: git_token}
image: {name: a}
secrets:
  git_token: {env: GIT_TOKEN}
  key: {file: key.pem}
"""


def test_store_resolves_env_and_file(tmp_path):
    (tmp_path / "key.pem").write_text("-----BEGIN-----\nabcdefgh\n-----END-----\n")
    p = load_pipeline_text(PIPELINE, str(tmp_path / "p.yml"), environ={})
    m = Masker()
    store = SecretStore.from_pipeline(p, {"GIT_TOKEN": "ghp_123456"}, m)
    check: Secrets = store  # structural: SecretStore implements the protocol
    assert callable(check.value)
    assert store.names() == ("git_token", "key")
    assert store.value("git_token") == "ghp_123456"
    assert store.value("key") == "-----BEGIN-----\nabcdefgh\n-----END-----"
    assert "key" in store and "nope" not in store
    assert "ghp_123456" not in repr(store)
    assert m.mask("token ghp_123456, key line abcdefgh") == "token ***, key line ***"
    with pytest.raises(KeyError, match="no secret named 'nope'"):
        store.value("nope")


def test_store_reports_every_unreadable_secret_with_location(tmp_path):
    p = load_pipeline_text(PIPELINE, str(tmp_path / "p.yml"), environ={})
    with pytest.raises(InvalidInput) as info:
        SecretStore.from_pipeline(p, {}, Masker())
    found = [(q.line, q.column, q.path, q.message) for q in info.value.problems]
    assert found[0][:3] == (5, 3, "secrets.git_token")
    assert "environment variable GIT_TOKEN is not set" in found[0][3]
    assert found[1][:3] == (6, 3, "secrets.key")
    assert "cannot read" in found[1][3] and "key.pem" in found[1][3]


def test_store_refuses_empty_values(tmp_path):
    (tmp_path / "key.pem").write_text("\n")
    p = load_pipeline_text(PIPELINE, str(tmp_path / "p.yml"), environ={})
    with pytest.raises(InvalidInput) as info:
        SecretStore.from_pipeline(p, {"GIT_TOKEN": ""}, Masker())
    messages = [q.message for q in info.value.problems]
    assert "GIT_TOKEN is empty" in messages[0] and "is empty" in messages[1]


def test_store_from_values_registers_with_masker():
    m = Masker()
    store = SecretStore({"a": "value-one", "b": Secret("value-two")}, masker=m)
    assert store.value("b") == "value-two"
    assert m.mask("value-one value-two") == "*** ***"


def test_withheld_store_reads_nothing_and_refuses_every_value(tmp_path):
    """--withhold-secrets: the names are known, no value is read (the file does not even exist
    and the variable is not set), and asking for one fails the stage, naming it and why."""
    p = load_pipeline_text(PIPELINE, str(tmp_path / "p.yml"), environ={})
    m = Masker()
    store = SecretStore.withheld(p, m)
    assert store.names() == ("git_token", "key") and "key" in store
    assert len(m) == 0
    for name in ("git_token", "key"):
        with pytest.raises(SecretWithheld) as info:
            store.value(name)
        assert isinstance(info.value, StageFailed)  # the stage that asked fails (exit 1)
        assert info.value.reason == (
            f"secret '{name}' is withheld from this run (--withhold-secrets: a pull request from "
            "a fork gets no secrets)")
    with pytest.raises(KeyError, match="no secret named 'nope'"):
        store.value("nope")
    assert "withheld=['git_token', 'key']" in repr(store)


def test_stage_secrets_are_found_where_each_stage_refers_to_them(tmp_path):
    from runner.engine import stage_secrets

    text = PIPELINE + """stages:
  build:
    secrets: [{id: npm, secret: key}]
  push:
    auth: {username: ci, password: git_token}
"""
    p = load_pipeline_text(text, str(tmp_path / "p.yml"), environ={})
    assert stage_secrets(p, "checkout") == [("repository.token", "git_token")]
    assert stage_secrets(p, "build") == [("stages.build.secrets[0].secret", "key")]
    assert stage_secrets(p, "push") == [("stages.push.auth.password", "git_token")]
    assert stage_secrets(p, "scan") == [] and stage_secrets(p, "deploy") == []


@pytest.mark.parametrize("reference", ["${GIT_TOKEN}", "${GIT_TOKEN:-x}", "${secrets.git_token}",
                                       "${secrets:git_token}"])
def test_secrets_are_never_interpolated(tmp_path, reference):
    """A secret is referred to by name, never interpolated: the variable that holds one, and
    `${secrets.X}`-style forms, are refused at load time (so --withhold-secrets has nothing to
    leak there either), and the error does not show the value."""
    text = PIPELINE.replace("image: {name: a}", f'image: {{name: "a/{reference}"}}')
    with pytest.raises(InvalidInput) as info:
        load_pipeline_text(text, str(tmp_path / "p.yml"), environ={"GIT_TOKEN": "ghp_987654"})
    assert "ghp_987654" not in str(info.value)
