"""Stand-in for transformers' tests/utils/test_configuration_utils.py (not in the sdist).

ConfigTester.check_config_arguments_init builds a config from `config_common_kwargs` and checks every
value comes back. Ours sets each field of the installed `PreTrainedConfig` that a caller passes, to a
non-default value (dtype must be float16: the check compares it with torch.float16).
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["AlignlineForCausalLM"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
