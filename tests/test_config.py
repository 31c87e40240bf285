"""Settings: precedence, errors that name the variable, secrets never shown."""

from __future__ import annotations

import pytest

from twivapi_cli.config import SETTINGS, Secret, load_settings
from twivapi_cli.errors import ConfigError


def test_precedence_flags_env_dotenv_defaults(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("TWIVAPI_MODE=bypass\nTWIVAPI_PORT=9000\nVAPI_ASSISTANT_ID=from-file\n")
    settings = load_settings({"port": 7000}, environ={"TWIVAPI_MODE": "native"}, env_file=env_file)
    assert settings.port == 7000            # flag beats everything
    assert settings.mode == "native"        # environment beats .env
    assert settings.vapi_assistant_id == "from-file"
    assert settings.vapi_base_url == "https://api.vapi.ai"  # default


@pytest.mark.parametrize("env, name", [
    ({"TWIVAPI_MODE": "sideways"}, "TWIVAPI_MODE"),
    ({"TWIVAPI_PORT": "http"}, "TWIVAPI_PORT"),
    ({"TWIVAPI_PUBLIC_URL": "ftp://x"}, "TWIVAPI_PUBLIC_URL"),
    ({"TWIVAPI_PUBLIC_URL": "https://Upper.Example.com"}, "TWIVAPI_PUBLIC_URL"),
    ({"TWILIO_ACCOUNT_SID": "ACshort"}, "TWILIO_ACCOUNT_SID"),
    ({"TWIVAPI_AUDIO_FORMAT": "mp3"}, "TWIVAPI_AUDIO_FORMAT"),
    ({"TWIVAPI_BARGE_IN": "always"}, "TWIVAPI_BARGE_IN"),
    ({"VAPI_HMAC_ALGORITHM": "md5"}, "VAPI_HMAC_ALGORITHM"),
    ({"VAPI_HMAC_ENCODING": "base32"}, "VAPI_HMAC_ENCODING"),
    ({"VAPI_HMAC_SIGNATURE_HEADER": "x signature"}, "VAPI_HMAC_SIGNATURE_HEADER"),
    ({"VAPI_HMAC_PAYLOAD_FORMAT": "{timestamp}"}, "VAPI_HMAC_PAYLOAD_FORMAT"),
    ({"VAPI_HMAC_INCLUDE_TIMESTAMP": "maybe"}, "VAPI_HMAC_INCLUDE_TIMESTAMP"),
])
def test_malformed_settings_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        load_settings({}, environ=env, env_file=None)


def test_missing_settings_are_named_with_how_to_set_them():
    settings = load_settings({}, environ={}, env_file=None)
    with pytest.raises(ConfigError) as info:
        settings.require("twilio_auth_token", "vapi_api_key")
    text = str(info.value)
    assert "TWILIO_AUTH_TOKEN" in text and "VAPI_API_KEY" in text and ".env" in text


def test_secrets_are_masked_everywhere():
    settings = load_settings({}, environ={"TWILIO_AUTH_TOKEN": "supersecret", "VAPI_API_KEY": "k-secret"},
                             env_file=None)
    assert isinstance(settings.twilio_auth_token, Secret)
    assert "supersecret" not in repr(settings) and "supersecret" not in str(settings.twilio_auth_token)
    assert settings.twilio_auth_token.reveal() == "supersecret"


def test_a_bad_secret_value_is_not_echoed():
    # secrets have no cast today, but the error path must never print a secret's value
    from twivapi_cli.config import Setting, _cast
    setting = Setting("x", "X_TOKEN", None, "", cast=int, secret=True)
    with pytest.raises(ConfigError) as info:
        _cast(setting, "hunter2", "the environment")
    assert "hunter2" not in str(info.value)


def test_missing_env_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does-not-exist"):
        load_settings({}, environ={}, env_file=tmp_path / "does-not-exist")


def test_every_setting_is_documented_in_readme_and_env_example():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    example = (root / ".env.example").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in readme, f"{setting.env} missing from README settings table"
        assert setting.env in example, f"{setting.env} missing from .env.example"
