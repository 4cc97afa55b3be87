"""Pipeline parallelism over the mesh's ``stage`` axis: schedules (GPipe, 1F1B, DualPipe) as
static timetables (``schedules``) and the tick loop that runs one inside ``shard_map``
(``runtime``). The model side (cutting DeepSeekModel into stages) is
``deepseek_jax.train.pipeline``."""

from deepseek_jax.parallel.pipeline.runtime import STAGE_AXIS, PipelineResult, run_pipeline
from deepseek_jax.parallel.pipeline.schedules import (SCHEDULES, Analysis, Schedule, Timetable,
                                                      analyse, stage_layers, timetable)

__all__ = ["STAGE_AXIS", "SCHEDULES", "Analysis", "PipelineResult", "Schedule", "Timetable",
           "analyse", "run_pipeline", "stage_layers", "timetable"]
