"""The service's request and response bodies (pydantic), and the limits on what one request may hold."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

ENDPOINTS = ("/recommend", "/recommend/batch", "/items", "/healthz", "/metrics", "/docs", "/openapi.json")


MAX_BATCH_REQUESTS = 256  # requests in one POST /recommend/batch


MAX_HISTORY_ITEMS = 10_000  # items in one request's history (it is cut to the model's window after)


MAX_ITEM_REF_CHARS = 512  # an id or title longer than this is no item of any catalogue: refused unread


def _item_ref(value):
    """An item id or title: a string, or an integer id (JSON numbers that are not integers, and
    booleans, are refused rather than turned into ids)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"an item id or title (a string or an integer), got {type(value).__name__}")
    text = str(value)
    if len(text) > MAX_ITEM_REF_CHARS:
        raise ValueError(f"an item id or title is at most {MAX_ITEM_REF_CHARS} characters, got {len(text)}")
    return text


ItemRef = Annotated[str, BeforeValidator(_item_ref)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[ItemRef] = Field(max_length=MAX_HISTORY_ITEMS, description=(
        "items the user interacted with, most recent last: item ids or titles (as in the data or normalised)"))
    candidates: list[ItemRef] | None = Field(None, description=(
        "items to rank; default: the teacher's top list over the items the user has not seen"))
    # strict: `true` and "5" are refused (a 422), not read as 1 and 5
    k: int = Field(10, strict=True, description="how many ranked items to return (a JSON integer)")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[RecommendRequest] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)


class Item(BaseModel):
    item: str  # the item's id in the data
    title: str
    score: float | None = None


class RecommendResponse(BaseModel):
    model: str
    items: list[Item]  # best first
    candidates_from: str
    history_used: list[str]
    history_truncated: int  # earliest history items left out (the model reads at most max_history)


class BatchResponse(BaseModel):
    results: list[RecommendResponse]
