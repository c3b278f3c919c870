#!/usr/bin/env python3
"""Adds the snapshot parameters (preset, restore_from, backups) to every plan of plans/postgres.json.

Run after adding a postgres plan; idempotent. Every postgres plan takes them (DESIGN.md: "Any postgres plan
takes `preset` and `backups`")."""
import json
import pathlib

PRESET = {
    "description": "Start from a preset (on update: reset the database to it): its name, or {name, namespace, version}; "
    "default version: the newest.",
    "oneOf": [
        {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"},
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"},
                "namespace": {"type": "string", "maxLength": 200},
                "version": {"type": "integer", "minimum": 1},
            },
        },
    ],
}
RESTORE_FROM = {
    "description": "Start from a backup of another instance: {instance, backup} (ids from its backups list).",
    "type": "object",
    "additionalProperties": False,
    "required": ["instance", "backup"],
    "properties": {
        "instance": {"type": "string", "minLength": 1, "maxLength": 255},
        "backup": {"type": "string", "pattern": "^[0-9a-fA-F-]{36}$"},
    },
}
BACKUPS = {
    "description": "Scheduled backups: cron schedule (5 fields, or 6 with seconds first, UTC), how many to keep "
    "(default 7), and whether deprovision keeps them (default) or deletes them. null on update stops them.",
    "type": ["object", "null"],
    "additionalProperties": False,
    "required": ["schedule"],
    "properties": {
        "schedule": {"type": "string", "minLength": 9, "maxLength": 100},
        "retention": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 7},
        "on_delete": {"type": "string", "enum": ["keep", "delete"], "default": "keep"},
    },
}

path = pathlib.Path(__file__).resolve().parent.parent / "plans" / "postgres.json"
catalog = json.loads(path.read_text())
for plan in catalog["plans"]:
    instance = plan["schemas"]["service_instance"]
    instance["create"]["parameters"]["properties"].update(
        {"preset": PRESET, "restore_from": RESTORE_FROM, "backups": BACKUPS}
    )
    instance["update"]["parameters"]["properties"].update({"preset": PRESET, "backups": BACKUPS})
path.write_text(json.dumps(catalog, indent=2, ensure_ascii=False) + "\n")
