"""Device-agnostic comparison engine: device resolution and vendor plugins, op capture and
isolated replay, metrics, the judgement rule, fault injection and reports. Knows nothing of DETR."""
