"""Content policy on prompts: rules decide both ways, trivial evasions fail, bad files are named with their line."""

import subprocess
import sys
from pathlib import Path

import pytest

from ldmkit.errors import ConfigError, MissingFileError
from ldmkit.governance.policy import load_policy
from ldmkit.governance.textforms import Forms

ROOT = Path(__file__).resolve().parents[2]

POLICY = """
[[rule]]
id = "nudity"
terms = ["nude", "naked"]
message = "images of nudity are not allowed"

[[rule]]
id = "brands"
terms = ["acme corp"]
patterns = ["\\\\blogo of [a-z]+\\\\b"]
roles = ["user", "viewer"]
message = "no trademarks; admins may test them"
"""


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return load_policy(path)


@pytest.mark.parametrize(
    "prompt",
    [
        "a nude portrait",
        "NUDE",
        "Ｎａｋｅｄ man",  # full-width letters (NFKC)
        "n\u200bu\u200dd\u00ade figure",  # zero-width characters and a soft hyphen
        "nud\u0435 painting",  # Cyrillic "е" is a look-alike of "e"
        "n.u.d.e",
        "a n.u.d.e portrait",  # a spelled-out word after a one-letter word
        "n u d e beach",
        "n4k3d",
        "N@KED",
    ],
)
def test_evasions_of_a_term_are_refused(policy, prompt):
    decision = policy.check(prompt)
    assert not decision.allowed and decision.rule == "nudity" and "nudity" in decision.message


@pytest.mark.parametrize("prompt", ["a red apple", "class portrait", "nudes-less", "denuded hills"])
def test_ordinary_prompts_and_longer_words_pass(policy, prompt):
    assert policy.check(prompt).allowed


def test_phrases_patterns_and_roles(policy):
    assert policy.check("ACME  Corp. poster").rule == "brands"
    assert policy.check("the logo of globex", role="user").rule == "brands"
    assert policy.check("the logo of globex", role="admin").allowed  # the rule names the roles it applies to
    assert policy.check("the logo of globex").rule == "brands"  # no role given: every rule applies


def test_normal_forms_are_word_strings():
    forms = Forms.of("a N.U.D.E!")
    assert forms.words[0] == " a n u d e " and "nude" in forms.runs and forms.plain[0] == " a n.u.d.e! "
    assert all(f.startswith(" ") and f.endswith(" ") for f in Forms.of("a  b\tc").words)


@pytest.mark.parametrize(
    "text, says",
    [
        ("[[rule]]\nid = 'x'\nmessage = 'm'\n", "line 1: rule 'x' has neither terms nor patterns"),
        ("# c\n\n[[rule]]\nid = 'x'\nterms = ['a']\n", "line 3: rule 'x' has no message"),
        ("[[rule]]\nid = 'x'\nterms = ['a']\nmessage='m'\n[[rule]]\nid = 'x'\nterms = ['b']\nmessage='m'\n", "line 5"),
        ("[[rule]]\nid = 'x'\npatterns = ['(']\nmessage='m'\n", "is not a regular expression"),
        ("[[rule]]\nid = 'x'\nterms = ['a']\nmessage='m'\nroles=['root']\n", "role 'root'"),
        ("[[rule]]\nid = 'x'\nterm = ['a']\nmessage='m'\n", "unknown key 'term'"),
        ("[[rule]\n", "not valid TOML"),
        ("rules = 1\n", "unknown table or key 'rules'"),
    ],
)
def test_a_malformed_policy_names_the_file_line_and_problem(tmp_path, text, says):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    assert str(path) in str(err.value) and says in str(err.value)


def test_a_missing_policy_file_is_named(tmp_path):
    with pytest.raises(MissingFileError, match="nope.toml"):
        load_policy(tmp_path / "nope.toml")


def test_policy_check_command(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)

    def run(*args):
        cmd = [sys.executable, "-m", "ldmkit.cli", "policy", "check", "--policy", str(path), *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)

    ok, refused = run("a red apple"), run("n.u.d.e selfie")
    assert ok.returncode == 0 and "allowed" in ok.stdout
    assert refused.returncode == 1 and "nudity" in refused.stdout and "not allowed" in refused.stdout
    assert run("logo of globex", "--role", "admin").returncode == 0


def test_the_server_refuses_with_the_rule_id_audits_and_counts_it(tmp_path):
    from ldmkit.serve.audit import Audit
    from ldmkit.serve.auth import Keys
    from ldmkit.serve.store import open_store
    from tests.serve_helpers import LiveServer

    path, db = tmp_path / "policy.toml", tmp_path / "db"
    path.write_text(POLICY)
    server = LiveServer(db, models=("emoji",), policy=str(path))
    try:
        keys = Keys(open_store(str(db)))
        user, admin = keys.create("u", "user")[0], keys.create("a", "admin")[0]
        with server.client(user) as c:
            r = c.post("/v1/images/generations", json={"prompt": "n.u.d.e beach", "steps": 2})
            assert r.status_code == 400 and r.json()["error"]["code"] == "policy_violation"
            assert r.json()["error"]["param"] == "prompt" and "'nudity'" in r.json()["error"]["message"]
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "logo of globex", "steps": 2})
            assert r.status_code == 400 and "'brands'" in r.json()["error"]["message"]
            assert c.post("/v1/jobs", json={"prompt": "naked", "steps": 2}).status_code == 400
            assert c.post("/v1/images/generations", json={"prompt": "a red apple", "steps": 2}).status_code == 200
        with server.client(admin) as c:  # the brands rule names the roles it applies to: not admin
            assert c.post("/sdapi/v1/txt2img", json={"prompt": "logo of globex", "steps": 2}).status_code == 200
            assert 'ldmkit_policy_refusals_total{rule="nudity"} 2.0' in c.get("/metrics").text
        rows = [r for r in Audit(open_store(str(db))).tail(50) if r["decision"] == "refused-policy"]
        assert len(rows) == 3 and {r["reason"] for r in rows} == {"policy rule nudity", "policy rule brands"}
        assert rows[0]["params"] == {"prompt": "n.u.d.e beach"} and not rows[0]["outputs"]
    finally:
        server.close()


def test_a_malformed_policy_stops_the_server_at_start(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("[[rule]]\nid = 'x'\nmessage = 'm'\n")
    cmd = [sys.executable, "-m", "ldmkit.cli", "serve", "--policy", str(path), "--database", str(tmp_path / "db")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and f"{path}, line 1" in out.stderr


def test_generate_obeys_the_policy_before_any_work(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    cmd = [sys.executable, "-m", "ldmkit.cli", "generate", "a cat", "n4k3d", "--policy", str(path)]
    out = subprocess.run([*cmd, "--out", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "'nudity'" in out.stderr and not (tmp_path / "x.png").exists()
