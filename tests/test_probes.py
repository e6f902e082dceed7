"""The reliability catalogue (``tests/probes.py``) as a test: at least 100 hostile or careless inputs, each
refused in one error line with exit code 2, leaving every file it names unchanged."""

import pytest

pytestmark = pytest.mark.slow  # a hundred command-line runs in this process (about a minute)


def test_every_probe_of_the_catalogue_holds(tmp_path):
    import probes

    results = probes.try_all(probes.make_world(tmp_path), probes.probes())
    broken = [(p.group, p.name, line) for p, held, line in results if not held]
    assert len(results) >= 100 and broken == []
