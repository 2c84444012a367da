"""transformers' common model tests run against the alignline model; see test_hf_battery.py."""
