"""ImageName: an image reference read once, with docker's grammar (distribution/reference) and
its normalisation, and the registry every stage takes from it (push logins, the deploy's
server-side `docker login`). Most names below without a digest were also given by hand to
`docker tag` on the lab's build engine (docker 20.10), which agreed, except on `[::1]:5000/app`
(that engine predates IPv6 registry hosts, which distribution/reference accepts since);
tests/lab/test_push.py asks it about a few on every run."""
from __future__ import annotations

import pytest

from deployers import commands as cmd
from deployers.plan import plan_deploy
from runner.model.deploy import DeploySettings
from runner.model.image import ImageName, ImageRef

D = "sha256:" + "a" * 64


@pytest.mark.parametrize("text,registry,repository,tag,digest", [
    ("docker.io/library/x", "docker.io", "library/x", None, None),
    ("x", "docker.io", "library/x", None, None),
    ("x:1.0", "docker.io", "library/x", "1.0", None),
    ("team/app", "docker.io", "team/app", None, None),
    ("index.docker.io/team/app", "docker.io", "team/app", None, None),
    ("docker.io/x", "docker.io", "library/x", None, None),
    ("localhost/app", "localhost", "app", None, None),
    ("localhost:5000/a/b:tag", "localhost:5000", "a/b", "tag", None),
    ("host:5000/a:1.2", "host:5000", "a", "1.2", None),
    ("10.87.53.1:5000/demo/app", "10.87.53.1:5000", "demo/app", None, None),
    (f"reg.io/a@{D}", "reg.io", "a", None, D),
    (f"reg.io/a:v1@{D}", "reg.io", "a", "v1", D),
    ("Registry.Example.com/app", "Registry.Example.com", "app", None, None),
    ("ghcr.io/o/my.app", "ghcr.io", "o/my.app", None, None),
    ("a__b/c--d", "docker.io", "a__b/c--d", None, None),
    ("[::1]:5000/app", "[::1]:5000", "app", None, None),
])
def test_parse_as_docker_reads_it(text, registry, repository, tag, digest):
    name = ImageName.parse(text)
    assert (name.registry, name.repository, name.tag, name.digest) == (
        registry, repository, tag, digest)


def test_forms():
    hub = ImageName.parse("team/app:v1")
    assert (hub.name, str(hub), hub.api_host) == (
        "docker.io/team/app", "docker.io/team/app:v1", "registry-1.docker.io")
    own = ImageName.parse(f"localhost:5000/a/b@{D}")
    assert (own.name, str(own), own.api_host) == (
        "localhost:5000/a/b", f"localhost:5000/a/b@{D}", "localhost:5000")


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("MyApp", "must be lowercase ('MyApp' -> 'myapp')"),
    ("team/App", "must be lowercase"),
    ("Team/app", "must be lowercase"),  # not a host: no '.' or ':' (the engine refuses it too)
    ("LOCALHOST/app", "must be lowercase"),
    ("host_x:5000/a", "invalid registry 'host_x:5000'"),
    ("reg.local:port/a", "invalid registry"),
    ("reg.io/a@sha256:abcd", "invalid digest"),
    ("reg.io/a@" + D.upper(), "invalid digest"),
    ("x:.bad", "invalid tag '.bad'"),
    ("x:" + "a" * 129, "invalid tag"),
    ("a" * 64, "64-hex image id"),
    ("reg.local/", "no repository path"),
    ("a/-b", "invalid path component '-b'"),
    ("reg.local//app", "invalid path component ''"),
    ("my app", "contains spaces"),
    ("a/" * 130 + "b", "longer than 255"),
])
def test_invalid_names_are_refused_saying_why(text, fragment):
    with pytest.raises(ValueError) as err:
        ImageName.parse(text)
    assert fragment in str(err.value)


def test_a_docker_hub_image_by_digest_logs_in_to_docker_hub_not_to_its_namespace():
    # team/app is Docker Hub's team/app: a deploy with a registry login must log in to
    # docker.io, not to a host called "team".
    assert ImageRef("team/app", D).registry == "docker.io"
    assert ImageRef("app", D).registry == "docker.io"
    assert ImageRef("10.87.53.1:5000/demo/app", D).registry == "10.87.53.1:5000"
    stage = DeploySettings.model_validate({"enabled": True, "servers": "10.0.0.1",
                                           "registry": {"username": "bob",
                                                        "password": "pw"}})
    plan = plan_deploy(stage, pipeline="demo", image_name="team/app", run_id="r1",
                       image=ImageRef("team/app", D))
    login = plan.servers[0].argv("login", {cmd.LOGIN_DIR: "/r/auth/x"})
    assert login[-1] == "docker.io"


def test_an_image_ref_names_no_tag_and_a_valid_repository():
    with pytest.raises(ValueError, match="also names tag 'v1'"):
        ImageRef("reg.io/app:v1", D)
    with pytest.raises(ValueError, match="must be lowercase"):
        ImageRef("reg.io/App", D)
