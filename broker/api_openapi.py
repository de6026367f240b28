"""The OpenAPI 3.1 document of the REST API, generated from the route table and the pydantic
models' JSON schemas (never written by hand)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from broker import __version__
from broker.api_models import ErrorOut

_PARAM = re.compile(r"{(\w+)}")
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Doc:
    """What the OpenAPI document says about one route."""

    method: str
    path: str
    operation_id: str
    summary: str
    response: type[BaseModel]
    status: int = 200
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    public: bool = False
    errors: tuple[int, ...] = field(default=(401, 403, 404, 409, 422))


def openapi(docs: Sequence[Doc], *, server_url: str = "/api/v1") -> dict[str, Any]:
    pairs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [(ErrorOut, "serialization")]
    for d in docs:
        pairs.append((d.response, "serialization"))
        if d.body is not None:
            pairs.append((d.body, "validation"))
        if d.query is not None:
            pairs.append((d.query, "validation"))
    unique = list(dict.fromkeys(pairs))
    _, top = models_json_schema(unique, ref_template=_REF)
    schemas: dict[str, Any] = top.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for d in docs:
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAM.findall(d.path)
        ]
        if d.query is not None:
            qs = schemas.get(d.query.__name__, {})
            required = set(qs.get("required", []))
            for name, prop in qs.get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": name in required, "schema": prop,
                               "description": prop.get("description", "")})
        for name, text in d.headers:
            params.append({"name": name, "in": "header", "required": False, "schema": {"type": "string"},
                           "description": text})
        op: dict[str, Any] = {
            "operationId": d.operation_id, "summary": d.summary,
            "responses": {str(d.status): {"description": d.response.__doc__ or d.response.__name__,
                                          "content": _json(d.response)}},
        }
        for code in d.errors:
            op["responses"][str(code)] = {"description": "error", "content": _json(ErrorOut)}
        if params:
            op["parameters"] = params
        if d.body is not None:
            op["requestBody"] = {"required": True, "content": _json(d.body)}
        if d.public:
            op["security"] = []
        paths.setdefault(d.path, {})[d.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "hoop API", "version": __version__,
                 "description": "Request, approve, read, revoke and delegate time-boxed access. "
                                "Authenticate with an OIDC bearer token."},
        "servers": [{"url": server_url}],
        "security": [{"oidc": []}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"oidc": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    }


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}
