"""Secrets in config values stay out of MLflow params, manifests, plan reasons and messages."""
from __future__ import annotations

from pipelines import tracking
from pipelines.redaction import MASK, redact, redact_override, redact_text


def test_secret_keys_and_url_passwords_are_masked():
    config = {"tracking": {"uri": "https://alice:s3cr3t@mlflow.example.org/"},
              "storage": {"api_token": "abc", "aws_secret_access_key": "xyz", "password": "pw", "key": "k",
                          "text_field": "body", "num_kv_heads": 4, "keep_checkpoints": 2},
              "data": {"paths": ["s3://AKIA123:hidden@bucket/corpus/*.jsonl", "/plain/path.txt"]}}
    masked = redact(config)
    assert masked["tracking"]["uri"] == f"https://alice:{MASK}@mlflow.example.org/"
    assert {k: masked["storage"][k] for k in ("api_token", "aws_secret_access_key", "password", "key")} == \
        dict.fromkeys(("api_token", "aws_secret_access_key", "password", "key"), MASK)
    assert masked["storage"]["text_field"] == "body" and masked["storage"]["num_kv_heads"] == 4
    assert masked["storage"]["keep_checkpoints"] == 2
    assert masked["data"]["paths"] == [f"s3://AKIA123:{MASK}@bucket/corpus/*.jsonl", "/plain/path.txt"]
    assert config["storage"]["password"] == "pw"  # the original is untouched
    assert "s3cr3t" not in redact_text("cannot reach https://alice:s3cr3t@mlflow.example.org/api")


def test_mlflow_params_never_hold_the_secret(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.Tracker(uri, "redaction", tmp_path)
    run_id = tracker.start("run", {"tracking": {"uri": "http://bob:hunter2@host:5000"},
                                   "task": {"fields": {"hf_token": "tok-123", "text": "body"}}}, {})
    params = tracker.client.get_run(run_id).data.params
    assert params["tracking.uri"] == f"http://bob:{MASK}@host:5000"
    assert params["task.fields.hf_token"] == MASK and params["task.fields.text"] == "body"
    assert "hunter2" not in tracking.ui_command("http://bob:hunter2@host:5000")


def test_query_string_secrets_and_overrides_are_masked():
    assert redact_text("GET https://h/x?access_token=abc&page=2&sig=zz#f") == \
        f"GET https://h/x?access_token={MASK}&page=2&sig={MASK}#f"
    assert redact_text("s3://b/k?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA") == \
        f"s3://b/k?X-Amz-Signature={MASK}&X-Amz-Credential={MASK}"
    assert redact_override("+tracking.api_token=abc") == f"+tracking.api_token={MASK}"
    assert redact_override("tracking.uri=http://u:pw@h/") == f"tracking.uri=http://u:{MASK}@h/"
    assert redact_override("finetune.lr=0.001") == "finetune.lr=0.001"


def test_counts_and_tokenizer_settings_named_token_stay_visible(tmp_path):
    config = {"eval": {"max_new_tokens": 32, "sample_prompt_tokens": 24},
              "finetune": {"prefix": {"num_virtual_tokens": 16}},
              "tokenizer": {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
                            "additional_special_tokens": ["<|user|>", "<|end|>"], "path": "/models/hf_cache/gpt2"},
              "data": {"text_field": "text", "sort_key": "doc_id"}}
    assert redact(config) == config
    assert redact_override("eval.max_new_tokens=64") == "eval.max_new_tokens=64"
    tracker = tracking.Tracker(f"sqlite:///{tmp_path}/mlflow.db", "redaction", tmp_path)
    params = tracker.client.get_run(tracker.start("run", config, {})).data.params
    assert params["eval.max_new_tokens"] == "32" and params["tokenizer.eos_token"] == "<|eos|>"
    assert params["finetune.prefix.num_virtual_tokens"] == "16"


def test_known_secret_names_and_token_shaped_values_are_masked():
    names = ["token", "access_token", "auth_token", "api_token", "hf_token", "HF_TOKEN", "github_token", "api_key",
             "apiKey", "aws_secret_access_key", "aws_access_key_id", "client_secret", "db_password", "credentials",
             "private_key", "mlflow_tracking_token"]
    assert redact({name: "plain" for name in names}) == dict.fromkeys(names, MASK)
    shaped = {"hf": "hf_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3h", "github": "ghp_" + "x1Y2z3" * 6,
              "openai": "sk-proj-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn", "aws": "AKIAIOSFODNN7EXAMPLE",
              "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"}
    for value in shaped.values():  # under a harmless key, alone or inside text
        assert redact({"note": value}) == {"note": MASK}
        assert value not in redact_text(f"Authorization failed for {value}, retrying")
    assert redact_override(f"+data.header={shaped['hf']}") == f"+data.header={MASK}"
    # a key that only hints at a secret: masked when the value looks random, shown when it does not
    assert redact({"vendor_token": "q8Zr2LmX0vTb7NcY4kWp"}) == {"vendor_token": MASK}
    assert redact({"vendor_token": "<|service|>", "cache_key": "doc_id"}) == \
        {"vendor_token": "<|service|>", "cache_key": "doc_id"}


def test_health_probe_sends_credentials_as_basic_auth_not_as_a_host():
    import base64
    import http.server
    import threading

    seen = {}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.update(path=self.path, auth=self.headers.get("Authorization"), host=self.headers.get("Host"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            """Quiet: the default handler writes every request to stderr."""

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.handle_request, daemon=True).start()
    port = server.server_address[1]
    try:
        assert tracking.unreachable(f"http://alice:p%40ss@127.0.0.1:{port}/mlflow/?access_token=t") is None
    finally:
        server.server_close()
    assert seen["path"] == "/mlflow/health" and seen["host"] == f"127.0.0.1:{port}"
    assert seen["auth"] == "Basic " + base64.b64encode(b"alice:p@ss").decode()
