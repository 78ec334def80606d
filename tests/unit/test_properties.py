"""Properties of the normaliser and the splitter, over generated inputs."""

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import LABELS, IngestConfig
from pipeline.data.sources import normalize_text, normalize_value
from pipeline.data.split import split_labeled


@given(st.text())
def test_normalising_is_idempotent_and_trims(text):
    for normalise in (normalize_text, normalize_value):
        once = normalise(text)
        assert normalise(once) == once
        assert once == once.strip()
        assert "  " not in once


sentences = st.lists(
    st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), min_size=3, max_size=40)
    .map(normalize_text)
    .filter(lambda t: len(t) >= 3),
    min_size=60, max_size=150, unique=True,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(sentences, st.randoms(use_true_random=False))
def test_split_is_a_disjoint_cover_and_ignores_input_order(texts, random):
    frame = pd.DataFrame({"text": texts, "label": [LABELS[i % 3] for i in range(len(texts))], "agreement": 50})
    cfg = IngestConfig()
    splits = split_labeled(frame, cfg)
    parts = [set(part["text"]) for part in splits.values()]
    assert sum(len(p) for p in parts) == len(texts)
    assert set().union(*parts) == set(texts)
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1 :])
    shuffled = frame.sample(frac=1.0, random_state=random.randint(0, 2**31 - 1))
    for name, part in split_labeled(shuffled, cfg).items():
        pd.testing.assert_frame_equal(part, splits[name])
