"""A created container's image layers, from its inspect to the capture: no
daemon needed (the event and the inspect's answer are made up), so these
run with the fast suite (test_enrich_docker_meta.py is all docker-marked)."""

from __future__ import annotations

import pytest


def _event(action: str, cid: str, **attrs) -> dict:
    return {"Type": "container", "Action": action, "Actor": {"ID": cid, "Attributes": attrs}}


def _overlay2(lower: object) -> dict:
    return {"Id": "ab" * 32, "GraphDriver": {"Name": "overlay2", "Data": {
        "LowerDir": lower, "UpperDir": "/var/lib/docker/overlay2/c1/diff",
        "MergedDir": "/var/lib/docker/overlay2/c1/merged", "WorkDir": "/var/lib/docker/overlay2/c1/work"}}}


@pytest.mark.parametrize("data, layers", [
    # The container's -init layer and its upper directory are its own, and hold no library.
    (_overlay2("/var/lib/docker/overlay2/c1-init/diff:/var/lib/docker/overlay2/l2/diff:/var/lib/docker/overlay2/l1/diff"),
     ["/var/lib/docker/overlay2/l2/diff", "/var/lib/docker/overlay2/l1/diff"]),
    (_overlay2("/var/lib/docker/overlay2/c1-init/diff"), []),  # an image of no layer
    ({"GraphDriver": {"Name": "btrfs", "Data": {"LowerDir": "/x"}}}, None),  # another storage driver
    ({"GraphDriver": {"Name": "overlayfs", "Data": None}}, None),  # containerd's snapshotter: not said
    ({}, None),
    ({"GraphDriver": "overlay2"}, None),
    (_overlay2(None), None),
    (_overlay2(["/a"]), None),
    (_overlay2("relative/diff:/b"), None),  # not host paths: not understood, nothing read
])
def test_a_created_containers_image_layers_are_read_from_its_inspect(data, layers):
    from qtap_devtools.enrich.docker_meta import image_layer_dirs

    assert image_layer_dirs(data) == layers


def test_a_created_containers_layers_go_to_the_capture_once_and_other_drivers_are_counted():
    """No daemon needed: the create event marks the id, its inspect (on the
    fetch thread) hands the layers over; an inspect for any other reason
    (a lookup, a rename) does not, nor does a second one."""
    from qtap_devtools.enrich.docker_meta import DockerMetadata

    meta = DockerMetadata("unix:///nonexistent.sock")
    meta._connected = True
    given: list[list[str]] = []
    meta._on_event(_event("create", "ab" * 32, name="early", image="img"))  # before the capture is running
    meta.on_layers = given.append
    meta._give_layers("ab" * 32, _overlay2("/l/diff"))
    assert given == []
    cid = "cd" * 32
    meta._on_event(_event("create", cid, name="web", image="img"))
    meta._give_layers(cid, _overlay2("/l/diff"))
    meta._give_layers(cid, _overlay2("/l/diff"))
    assert given == [["/l/diff"]] and meta.stats()["layers_given"] == 1
    other = "ef" * 32
    meta._on_event(_event("create", other, name="on-btrfs", image="img"))
    meta._give_layers(other, {"GraphDriver": {"Name": "btrfs"}})
    assert given == [["/l/diff"]] and meta.stats()["layers_not_overlay"] == 1
    gone = "12" * 32
    meta._on_event(_event("create", gone, name="quick", image="img"))
    meta._on_event(_event("destroy", gone))
    assert gone not in meta._want_layers  # removed before its inspect: not kept waiting


def test_a_failure_handing_the_layers_over_costs_the_container_nothing():
    from qtap_devtools.enrich.docker_meta import DockerMetadata

    meta = DockerMetadata("unix:///nonexistent.sock")
    meta._connected = True
    cid = "cd" * 32

    def broken(layers):
        raise RuntimeError("a bug in the capture")

    meta.on_layers = broken
    meta._on_event(_event("create", cid, name="web", image="img"))
    meta._give_layers(cid, _overlay2("/l/diff"))  # logged, not raised into the inspect's path
    assert meta.stats()["layers_given"] == 0 and meta.lookup_nowait(cid).name == "web"


def _image(upper: object, lower: object = None) -> dict:
    data = {"UpperDir": upper, "MergedDir": "/var/lib/docker/overlay2/i1/merged"}
    if lower is not None:
        data["LowerDir"] = lower
    return {"Id": "sha256:" + "ab" * 32, "GraphDriver": {"Name": "overlay2", "Data": data}}


@pytest.mark.parametrize("data, layers", [
    (_image("/var/lib/docker/overlay2/l3/diff", "/var/lib/docker/overlay2/l2/diff:/var/lib/docker/overlay2/l1/diff"),
     ["/var/lib/docker/overlay2/l3/diff", "/var/lib/docker/overlay2/l2/diff", "/var/lib/docker/overlay2/l1/diff"]),
    (_image("/var/lib/docker/overlay2/l1/diff"), ["/var/lib/docker/overlay2/l1/diff"]),  # one layer: no LowerDir
    ({"GraphDriver": {"Name": "btrfs", "Data": {"UpperDir": "/x"}}}, None),
    (_image(None, "/a"), None),
    (_image("/a", ["/b"]), None),
    (_image("relative", "/b"), None),
    ({}, None),
])
def test_an_images_layers_are_read_from_its_inspect(data, layers):
    from qtap_devtools.enrich.docker_meta import layers_of_image

    assert layers_of_image(data) == layers


class _ImageInspects:
    """What the fetch thread asks the daemon's API for an image: made-up
    answers (the daemon's own are checked in test_e2e_docker_layers.py)."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def inspect_image(self, image):
        self.asked.append(image)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _created(cid: str):
    """A DockerMetadata (no daemon) told of ``cid``'s create, and the layers it hands the capture."""
    from qtap_devtools.enrich.docker_meta import DockerMetadata

    meta = DockerMetadata("unix:///nonexistent.sock")
    meta._connected = True
    given: list[list[str]] = []
    meta.on_layers = given.append
    meta._on_event(_event("create", cid, name="web", image="curl:8"))
    return meta, given


def test_a_created_containers_layers_come_from_its_images_inspect_before_its_own():
    """The image's inspect is answered while the container is being started;
    the container's own inspect then hands nothing over again."""
    cid = "cd" * 32
    meta, given = _created(cid)
    api = _ImageInspects(_image("/l/3/diff", "/l/2/diff"))
    meta._layers_from_image(api, cid)
    meta._give_layers(cid, _overlay2("/var/lib/docker/overlay2/c1-init/diff:/l/3/diff:/l/2/diff"))
    assert api.asked == ["curl:8"] and given == [["/l/3/diff", "/l/2/diff"]]
    assert meta.stats()["layers_given"] == 1 and meta.stats()["layers_from_image"] == 1


@pytest.mark.parametrize("answer", [RuntimeError("404 Client Error: no such image"), {"GraphDriver": {"Name": "btrfs"}}])
def test_an_image_inspect_that_fails_leaves_the_layers_to_the_containers_inspect(answer):
    cid = "cd" * 32
    meta, given = _created(cid)
    meta._layers_from_image(_ImageInspects(answer), cid)
    assert given == []
    meta._give_layers(cid, _overlay2("/var/lib/docker/overlay2/c1-init/diff:/l/1/diff"))
    assert given == [["/l/1/diff"]]
    assert meta.stats()["layers_given"] == 1 and meta.stats()["layers_from_image"] == 0


@pytest.mark.parametrize("attributes", [["image", "x"], {"image": 7}, {"image": ""}, None])
def test_a_create_event_that_names_no_image_leaves_the_layers_to_the_containers_inspect(attributes):
    """The daemon's events are untrusted: an odd ``Attributes`` asks for no image."""
    from qtap_devtools.enrich.docker_meta import DockerMetadata

    meta = DockerMetadata("unix:///nonexistent.sock")
    meta._connected = True
    given: list[list[str]] = []
    meta.on_layers = given.append
    cid = "cd" * 32
    meta._on_event({"Type": "container", "Action": "create", "Actor": {"ID": cid, "Attributes": attributes}})
    api = _ImageInspects(_image("/l/9/diff"))
    meta._layers_from_image(api, cid)
    assert api.asked == [] and given == []
    meta._give_layers(cid, _overlay2("/var/lib/docker/overlay2/c1-init/diff:/l/1/diff"))
    assert given == [["/l/1/diff"]]
