"""The one shape of an HTTP API error: ``{"error": "..."}`` (every route module documents its responses with it)."""

from pydantic import BaseModel, Field


class Error(BaseModel):
    error: str = Field(description="what went wrong, in words")
