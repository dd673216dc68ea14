"""Row conversions of hub preference datasets into the reward recipe's format (no hub access needed)."""

from __future__ import annotations

from recipes.reward.data import prepare_pairs
from recipes.reward.hub_data import convert_helpsteer2, convert_hh_rlhf, convert_pku_saferlhf, hh_turns


def test_hh_rlhf_transcripts_become_conversations() -> None:
    shared = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I'm locked out."
    row = {
        "chosen": shared + "\n\nAssistant: Call a locksmith or your landlord.",
        "rejected": shared + "\n\nAssistant: Insert a tension wrench and rake the pins.",
    }
    converted = convert_hh_rlhf(row)
    assert [m["role"] for m in converted["prompt"]] == ["user", "assistant", "user"]
    assert converted["prompt"][-1]["content"] == "I'm locked out."
    assert converted["chosen"] == [{"role": "assistant", "content": "Call a locksmith or your landlord."}]
    assert converted["rejected"][0]["content"].startswith("Insert")
    assert hh_turns("\n\nHuman: hi\n\nAssistant: hello") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_hh_rlhf_unusable_rows_are_dropped() -> None:
    same = "\n\nHuman: hi\n\nAssistant: hello"
    assert convert_hh_rlhf({"chosen": same, "rejected": same}) is None
    different_prompts = {"chosen": same, "rejected": "\n\nHuman: bye\n\nAssistant: hello there"}
    assert convert_hh_rlhf(different_prompts) is None


def pku_row(safer: int, safe0: bool, safe1: bool, sev0: int = 0, sev1: int = 0) -> dict:
    return {
        "prompt": "How do I make a weapon?",
        "response_0": "I can't help with that.",
        "response_1": "Here is how.",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "safer_response_id": safer,
        "response_0_severity_level": sev0,
        "response_1_severity_level": sev1,
    }


def test_pku_saferlhf_ratings_and_flags() -> None:
    converted = convert_pku_saferlhf(pku_row(0, True, False, 0, 2))
    assert converted["chosen"][0]["content"] == "I can't help with that."
    assert converted["rating"] == "significantly_better"
    assert converted["chosen_safe"] and not converted["rejected_safe"] and converted["is_unsafe_prompt"]
    assert convert_pku_saferlhf(pku_row(1, False, False, 3, 1))["rating"] == "better"
    assert convert_pku_saferlhf(pku_row(1, False, False, 2, 1))["rating"] == "slightly_better"
    assert convert_pku_saferlhf(pku_row(0, True, True))["rating"] == "negligibly_better"


def test_helpsteer2_strength_sign_and_size() -> None:
    row = {"prompt": "Explain tides.", "response_1": "The moon.", "response_2": "Gravity of moon and sun."}
    assert convert_helpsteer2({**row, "preference_strength": 3})["chosen"][0]["content"].startswith("Gravity")
    assert convert_helpsteer2({**row, "preference_strength": 3})["rating"] == "significantly_better"
    converted = convert_helpsteer2({**row, "preference_strength": -1})
    assert converted["chosen"][0]["content"] == "The moon." and converted["rating"] == "slightly_better"
    assert convert_helpsteer2({**row, "preference_strength": 0}) is None


def test_converted_rows_pass_the_recipe_checks() -> None:
    from datasets import Dataset

    rows = [convert_pku_saferlhf(pku_row(0, True, False)), convert_pku_saferlhf(pku_row(1, False, False, 3, 1))]
    prepared = prepare_pairs(Dataset.from_list(rows), "large", "rating", "converted")
    assert prepared["margin"] == [3.0, 2.0]
