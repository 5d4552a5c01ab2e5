"""Label Studio's REST API as the pre-annotation side sees it: what a user is told when it goes wrong."""

from __future__ import annotations

import socket

import pytest
from pydantic import SecretStr

from backend import preannotate
from backend.labelstudio import LabelStudioAPI, LabelStudioError
from tests.standin_ls import png

CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="label" toName="image"><Label value="Car"/></PolygonLabels></View>"""


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_project_label_studio_does_not_have_is_named(settings):
    with pytest.raises(LabelStudioError, match=r"Label Studio at http://127\.0\.0\.1:\d+ has no project 999 \(404\)"):
        LabelStudioAPI(settings).label_config(999)


def test_a_refused_api_key_says_which_setting_to_check(settings, label_studio):
    label_studio.add_project(21, CONFIG)
    wrong = settings.model_copy(update={"label_studio_api_key": SecretStr("not-the-token")})
    with pytest.raises(LabelStudioError, match="refused the API key .401. for project 21: check LABEL_STUDIO_API_KEY"):
        LabelStudioAPI(wrong).label_config(21)


def test_an_unreachable_label_studio_says_which_setting_to_check(settings):
    elsewhere = settings.model_copy(update={"label_studio_url": f"http://127.0.0.1:{closed_port()}"})
    with pytest.raises(LabelStudioError, match="cannot reach Label Studio at .* check LABEL_STUDIO_URL"):
        LabelStudioAPI(elsewhere).label_config(21)


def test_preannotate_refuses_task_ids_the_project_does_not_have(settings, redis, label_studio):
    label_studio.add_project(22, CONFIG)
    present = label_studio.add_task(22, {"image": label_studio.upload("p22.png", png(32, 32), project=22)})
    with pytest.raises(LookupError, match="project 22 has no tasks 555, 556; nothing was queued"):
        preannotate.start(settings, redis, 22, task_ids=[present, 555, 556])
    assert redis.llen("rq:queue:predict") == 0
