"""Signing against Twilio's documented vectors, with twilio's RequestValidator as the oracle."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from twivapi_cli import signing

DOC_URL = "https://example.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {"Digits": "1234", "To": "+18005551212", "From": "+14158675310", "Caller": "+14158675310",
              "CallSid": "CA1234567890ABCDE"}
P1 = {"CallSid": "CA1234567890ABCDE", "Digits": "1234", "From": "+14158675309", "To": "+18005551212",
      "Caller": "+14158675309"}


def test_documented_vector():
    assert signing.twilio_signature("12345", DOC_URL, DOC_PARAMS) == "L/OH5YylLD5NRKLltdqwSvS0BnU="
    assert signing.verify_twilio("12345", DOC_URL, DOC_PARAMS, "L/OH5YylLD5NRKLltdqwSvS0BnU=")


@pytest.mark.parametrize("url, expected", [
    ("https://mycompany.com/myapp.php?foo=1&bar=2", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
    ("https://mycompany.com:443/myapp.php?foo=1&bar=2", "kvajT1Ptam85bY51eRf/AJRuM3w="),
    ("http://mycompany.com:80/myapp.php?foo=1&bar=2", "0ZXoZLH/DfblKGATFgpif+LLRf4="),
    ("http://mycompany.com:1234/myapp.php?foo=1&bar=2", "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),
])
def test_reference_vectors_and_port_rules(url, expected):
    assert signing.twilio_signature("12345", url, P1) == expected
    # a validator configured without the port accepts a signature made with it, and vice versa
    assert signing.verify_twilio("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", P1,
                                 "kvajT1Ptam85bY51eRf/AJRuM3w=")


def test_repeated_keys():
    params = signing.Params({"Sid": ["CA123"], "SidAccount": ["AC123"], "Digits": ["5678", "1234"]})
    assert signing.twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", params) \
        == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


def test_blank_values_are_signed():
    parsed = signing.parse_form(b"CallSid=CA1&CallToken=&To=%2B1555")
    assert parsed["CallToken"] == [""]
    with_blank = signing.twilio_signature("t", "https://h/x", parsed)
    without = signing.twilio_signature("t", "https://h/x", {"CallSid": "CA1", "To": "+1555"})
    assert with_blank != without


def test_json_body_vector():
    body = b'{"property": "value", "boolean": true}'
    assert signing.body_sha256(body) == "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
    url, sig = signing.sign_twilio_json("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", body)
    assert sig == "a9nBmqA0ju/hNViExpshrM61xv4="
    assert signing.verify_twilio("12345", url, None, sig, body)
    assert not signing.verify_twilio("12345", url, None, sig, body + b" ")


def test_json_body_without_hash_in_url_fails():
    body = b'{"a": 1}'
    sig = signing.twilio_signature("12345", "https://h/x", None)
    assert not signing.verify_twilio("12345", "https://h/x", None, sig, body)


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=200, deadline=None)
@given(params=st.dictionaries(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef", min_size=1, max_size=8), text,
                              max_size=6),
       token=st.text(min_size=1, max_size=32), flip=st.integers(min_value=0, max_value=1000))
def test_signatures_verify_and_any_change_fails(params, token, flip):
    url = "https://bridge.example.test/twilio/voice?x=1"
    sig = signing.twilio_signature(token, url, params)
    assert RequestValidator(token).validate(url, params, sig)  # the SDK agrees
    assert signing.verify_twilio(token, url, params, sig)
    assert not signing.verify_twilio(token + "x", url, params, sig)
    assert not signing.verify_twilio(token, url + "0", params, sig)
    if params:
        name = sorted(params)[flip % len(params)]
        changed = dict(params, **{name: params[name] + "!"})
        assert not signing.verify_twilio(token, url, changed, sig)


def test_candidate_urls_cover_scheme_host_port_and_slash():
    urls = signing.candidate_urls("https://pub.example.com", "/twilio/voice?a=1",
                                  {"host": "127.0.0.1:3000", "x-forwarded-proto": "https"}, "http")
    assert "http://127.0.0.1:3000/twilio/voice?a=1" in urls
    assert "https://127.0.0.1:3000/twilio/voice?a=1" in urls
    assert "https://pub.example.com/twilio/voice/?a=1" in urls


@pytest.mark.parametrize("mode", ["secret", "signature", "bearer", "hmac", "hmac-body"])
def test_vapi_sign_verify_round_trip(mode):
    body = b'{"message":{"type":"hang"}}'
    headers = {k.lower(): v for k, v in signing.sign_vapi("s3cret", body, mode).items()}
    assert signing.verify_vapi("s3cret", headers, body)[0]
    assert not signing.verify_vapi("other", headers, body)[0]
    if mode in ("hmac", "hmac-body"):
        assert not signing.verify_vapi("s3cret", headers, body + b" ")[0]


def test_vapi_body_hmac_header():
    body = b"{}"
    headers = {"x-vapi-signature": signing.vapi_hmac("k", body, None)}
    assert signing.verify_vapi("k", headers, body) == (True, "hmac-body")


def test_the_legacy_plain_token_in_x_vapi_signature_is_accepted():
    """Older Vapi docs: the server secret "sent as X-Vapi-Signature", the plain token (legacy setups)."""
    body = b'{"message":{"type":"hang"}}'
    assert signing.verify_vapi("s3cret-token", {"x-vapi-signature": "s3cret-token"}, body) == (True, "x-vapi-signature")
    assert not signing.verify_vapi("s3cret-token", {"x-vapi-signature": "s3cret-tokem"}, body)[0]
    # the plan's own header named x-vapi-signature: an HMAC there, or the plain token
    plan = signing.HmacPlan(signature_header="x-vapi-signature", include_timestamp=False)
    assert signing.verify_vapi("s3cret-token", {"x-vapi-signature": "s3cret-token"}, body, plan=plan)[0]
    signed = signing.sign_vapi("s3cret-token", body, "hmac", plan=plan)
    assert signing.verify_vapi("s3cret-token", {k.lower(): v for k, v in signed.items()}, body, plan=plan) \
        == (True, "hmac")


def _oracle(secret: str, payload: bytes, algorithm: str, encoding: str, secret_is_base64: bool) -> str:
    """The HMAC computed independently of HmacPlan: hashlib/hmac/base64 straight from the spec's words."""
    import base64
    import hashlib
    import hmac as hmac_module
    key = base64.b64decode(secret) if secret_is_base64 else secret.encode()
    digest = hmac_module.new(key, payload, getattr(hashlib, algorithm)).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "sha1"])
@pytest.mark.parametrize("encoding", ["hex", "base64"])
@pytest.mark.parametrize("timestamped", [True, False])
@pytest.mark.parametrize("secret_is_base64", [False, True])
def test_every_hmac_authentication_plan_option(algorithm, encoding, timestamped, secret_is_base64):
    import base64
    import time
    secret = base64.b64encode(b"\x00raw-key-bytes\xff").decode() if secret_is_base64 else "plain-secret"
    body = b'{"message":{"type":"status-update","status":"in-progress"}}'
    plan = signing.HmacPlan(algorithm=algorithm, signature_encoding=encoding, include_timestamp=timestamped,
                            signature_header="x-acme-signature", timestamp_header="x-acme-time",
                            secret_is_base64=secret_is_base64)
    ts = str(int(time.time()))
    payload = f"{ts}.".encode() + body if timestamped else body
    headers = {"x-acme-signature": _oracle(secret, payload, algorithm, encoding, secret_is_base64)}
    if timestamped:
        headers["x-acme-time"] = ts
    assert signing.verify_vapi(secret, headers, body, plan=plan) == (True, "hmac")
    assert not signing.verify_vapi(secret, headers, body + b" ", plan=plan)[0]           # altered body
    assert not signing.verify_vapi(secret, headers, body)[0]                             # the default plan
    other = "b3RoZXI=" if secret_is_base64 else "other-secret"
    assert not signing.verify_vapi(other, headers, body, plan=plan)[0]
    if timestamped:
        stale = {**headers, "x-acme-time": str(int(time.time()) - 3600)}
        assert not signing.verify_vapi(secret, stale, body, plan=plan)[0]
        assert not signing.verify_vapi(secret, {"x-acme-signature": headers["x-acme-signature"]}, body, plan=plan)[0]
    # and what sign_vapi makes under the same plan verifies
    made = {k.lower(): v for k, v in signing.sign_vapi(secret, body, "hmac", plan=plan).items()}
    assert ("x-acme-time" in made) is timestamped
    assert signing.verify_vapi(secret, made, body, plan=plan) == (True, "hmac")


def test_hmac_prefix_payload_format_and_message_id():
    import time
    body = b'{"message":{"type":"hang"}}'
    plan = signing.HmacPlan(signature_prefix="v1,", payload_format="{svix-id}.{timestamp}.{method}.{url}.{body}",
                            message_id_header="svix-id", signature_header="svix-signature",
                            timestamp_header="svix-timestamp", signature_encoding="base64")
    ts, url = str(int(time.time())), "https://bridge.example.test/vapi/webhook"
    payload = f"msg_1.{ts}.POST.{url}.".encode() + body
    headers = {"svix-id": "msg_1", "svix-timestamp": ts,
               "svix-signature": "v1," + _oracle("k", payload, "sha256", "base64", False)}
    assert signing.verify_vapi("k", headers, body, plan=plan, url=url) == (True, "hmac")
    assert not signing.verify_vapi("k", {**headers, "svix-id": "msg_2"}, body, plan=plan, url=url)[0]
    assert not signing.verify_vapi("k", headers, body, plan=plan, url=url + "/")[0]
    unprefixed = {**headers, "svix-signature": headers["svix-signature"].removeprefix("v1,")}
    assert not signing.verify_vapi("k", unprefixed, body, plan=plan, url=url)[0]
    # no prefix configured: "sha256=<hex>" (GitHub style) is taken as well as the bare digest
    default = signing.HmacPlan()
    bare = _oracle("k", f"{ts}.".encode() + body, "sha256", "hex", False)
    for value in (bare, "sha256=" + bare, bare.upper()):
        assert signing.verify_vapi("k", {"x-signature": value, "x-timestamp": ts}, body, plan=default)[0]


def test_a_base64_secret_that_is_not_base64_is_refused_with_the_reason():
    plan = signing.HmacPlan(secret_is_base64=True, include_timestamp=False)
    ok, why = signing.verify_vapi("not base64!", {"x-signature": "ab"}, b"{}", plan=plan)
    assert not ok and "base64" in why and "not base64!" not in why
