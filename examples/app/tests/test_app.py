"""The app's own answers, through Flask's test client."""
from app import app


def test_index_says_hello():
    answer = app.test_client().get("/").get_json()
    assert answer["message"] == "hello from runner"


def test_healthz():
    assert app.test_client().get("/healthz").data == b"ok\n"
