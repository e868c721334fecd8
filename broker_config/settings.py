"""Environment-driven settings (pydantic-settings): one place that names every knob and its default."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TasktreeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TASKTREE_", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (redis:// or amqp://)")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/1", description="Blackboards, caches, signals and completions"
    )
    imports: str = Field("", description="Comma-separated modules a worker imports at start (they build trees)")

    @property
    def import_list(self) -> list[str]:
        return [name.strip() for name in self.imports.split(",") if name.strip()]


@lru_cache
def get_settings() -> TasktreeSettings:
    return TasktreeSettings()
