"""The OpenAPI 3.1 description of the explorer's JSON API, written by hand (served at
/api/openapi.json). tests/web/test_api.py checks that it names every route and every error
status the routes answer with."""

from __future__ import annotations

from .service import LEVELS, METHODS, Limits


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _post_errors(extra: dict) -> dict:
    errors = {
        "400": _error("malformed JSON or a body that is not UTF-8 (code malformed_json), a bad Content-Length "
                      "header (bad_request), or a Host header that is not the server's own (bad_host)"),
        "404": _error("unknown model (code unknown_model): only names listed by GET /api/models"),
        "405": _error("a method other than POST (method_not_allowed)"),
        "413": _error("body larger than the limit (body_too_large), or a text longer than max_chars (text_too_long)"),
        "415": _error("the body is not sent as application/json (unsupported_media_type)"),
        "422": _error("a field is missing (missing_field), unknown (unknown_field), of the wrong type (wrong_type), "
                      "or has a value not offered (bad_value); an empty text (empty_text); a text that is not valid "
                      "Unicode, e.g. a lone surrogate \\ud800 (bad_text); a word not in the text (unknown_word); a "
                      "layer or head the model lacks (unknown_layer, unknown_head); a text the model cannot take, "
                      "e.g. more tokens than it has positions (cannot_explain); the step-through asked of an "
                      "encoder-decoder model (not_supported)"),
        "500": _error("an unexpected error (internal) or a model that could not be loaded (model_unavailable); "
                      "no details are sent"),
        "503": {**_error("the queue is full (busy); try again (see Retry-After)"),
                "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    }
    errors.update(extra)
    return errors


def openapi_schema(limits: Limits = Limits()) -> dict:
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_chars,
            "description": f"the sentence (at most {limits.max_chars} characters)"}
    word = {"oneOf": [{"type": "string", "minLength": 1, "maxLength": 200}, {"type": "integer", "minimum": 0}],
            "description": "a word of the text (first match, case-insensitive) or its index among the shown "
                           "labels at `level`"}
    common = {
        "model": {"type": "string", "default": "minilm",
                  "description": "a model name from GET /api/models (never a path)"},
        "method": {"type": "string", "enum": list(METHODS), "default": "raw"},
        "level": {"type": "string", "enum": list(LEVELS), "default": "word"},
        "hide_special": {"type": "boolean", "default": False,
                         "description": "hide [CLS], [SEP], BOS and renormalise rows"},
    }
    matrix = {"type": "array", "items": {"type": "array", "items": {"type": ["number", "null"]}}}
    vector = {"type": "array", "items": {"type": ["number", "null"]}}
    schemas = {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["status", "code", "message"], "properties": {
                "status": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"}}}},
        },
        "ExplainRequest": {
            "type": "object", "required": ["text"], "additionalProperties": False,
            "properties": {"text": text, "focus": {**word, "description": "the focus word (optional)"}, **common},
        },
        "Explain": {
            "type": "object",
            "description": "the \"qkv.explain/1\" dict of ExplainResult.to_dict(): maps[layer][head][query][key]",
            "required": ["format", "model", "text", "method", "level", "labels", "special", "layers", "heads",
                         "head_names", "maps", "normalised", "focus", "entropy"],
            "properties": {
                "format": {"const": "qkv.explain/1"}, "model": {"type": "string"}, "text": {"type": "string"},
                "method": {"type": "string"}, "level": {"type": "string"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "special": {"type": "array", "items": {"type": "boolean"}},
                "layers": {"type": "integer"}, "heads": {"type": "integer"},
                "head_names": {"type": "array", "items": {"type": "string"}},
                "maps": {"type": "array", "items": {"type": "array", "items": matrix}},
                "normalised": {"type": "boolean"}, "entropy": matrix,
                "focus": {"type": ["object", "null"]}, "selected": {"type": "object"},
            },
        },
        "StepsRequest": {
            "type": "object", "required": ["text", "word", "layer", "head"], "additionalProperties": False,
            "properties": {"text": text, "word": word, "layer": {"type": "integer", "minimum": 0},
                           "head": {"type": "integer", "minimum": 0}, "model": common["model"],
                           "level": common["level"], "hide_special": common["hide_special"]},
        },
        "Steps": {
            "type": "object",
            "description": "one query token in one head, the seeds' three steps: scores = dots * scale (null where "
                           "masked), weights = softmax(scores), output = sum_j weights_j * values_j",
            "properties": {
                "format": {"const": "qkv.steps/1"}, "model": {"type": "string"}, "text": {"type": "string"},
                "layer": {"type": "integer"}, "head": {"type": "integer"}, "layers": {"type": "integer"},
                "heads": {"type": "integer"}, "token": {"type": "integer"}, "token_label": {"type": "string"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "special": {"type": "array", "items": {"type": "boolean"}}, "scale": {"type": "number"},
                "query": vector, "keys": matrix, "dots": vector, "scores": vector, "weights": vector,
                "values": matrix, "output": vector,
            },
        },
        "CompareRequest": {
            "type": "object", "required": ["text", "other"], "additionalProperties": False,
            "properties": {"text": text, "other": text, "focus": word, **common},
        },
        "Compare": {
            "type": "object",
            "properties": {
                "format": {"const": "qkv.compare/1"}, "a": _ref("Explain"), "b": _ref("Explain"),
                "same_length": {"type": "boolean"},
                "jsd": {**matrix, "description": "Jensen-Shannon divergence (bits) of the focus rows, [layer][head]; "
                                                 "null without a focus or for sentences of different lengths"},
                "largest": {"type": ["object", "null"]}, "note": {"type": ["string", "null"]},
            },
        },
    }

    def post(summary: str, request: str, response: str, extra: dict | None = None) -> dict:
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {"200": _json(_ref(response), "the result"), **_post_errors(extra or {})},
        }}

    def get(summary: str, schema: dict) -> dict:
        return {"get": {"summary": summary, "responses": {
            "200": _json(schema, "the result"),
            "500": _error("an unexpected error (internal); no details are sent"),
        }}}

    paths = {
        "/api/health": get("liveness and queue state; never waits for a model", {"type": "object"}),
        "/api/models": get("the models this server offers, its limits, methods and levels", {"type": "object"}),
        "/api/openapi.json": get("this description", {"type": "object"}),
        "/api/explain": post("attention maps of a sentence (ExplainResult.to_dict)", "ExplainRequest", "Explain"),
        "/api/steps": post("the three steps for one word in one head, with real numbers", "StepsRequest", "Steps"),
        "/api/compare": post("two sentences side by side, with the per-head divergence of a focus word",
                             "CompareRequest", "Compare"),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "qkv attention explorer", "version": "1",
                 "description": "The JSON API of `qkv serve`. Errors are {\"error\": {status, code, message}}. "
                                "Unknown paths answer 404 and wrong methods 405, in the same form."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
