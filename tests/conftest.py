"""Hypothesis without its per-example deadline: a wall-clock limit (200 ms by default) fails a
correct test on a slow or busy machine (seen: `test_sotw_response_parses` while another suite
ran). Speed is measured in bench/, never asserted in tests."""

from hypothesis import settings

settings.register_profile("repstage", deadline=None)
settings.load_profile("repstage")
