"""Synthetic data of the offline continual-learning benchmark: 32x32 scenes, single-word questions and answers.

`general_corpus` stands for pre-training, `general_eval_suite` measures what is kept of it, and the image
tasks of `IMAGE_TASKS` (and video tasks of `VIDEO_TASKS`) are learnt one after another. `write_benchmark`
puts all of it on disk as LLaVA / video-QA JSON that `load_llava_json` / `load_video_qa_json` read.
"""

from .scenes import COLOURS, IMAGE_SIZE, PALETTE
from .tasks import (
    GENERAL_SKILLS,
    IMAGE_TASKS,
    TASK_SPECS,
    Sample,
    TaskSpec,
    general_corpus,
    general_eval_suite,
    make_task,
)
from .videos import NUM_FRAMES, VIDEO_SPECS, VIDEO_TASKS, VideoSample, make_video_task
from .vocabulary import WORDS, check_vocabulary, uncovered_words
from .writer import MANIFEST_NAME, write_benchmark, write_llava_json, write_video_qa_json

__all__ = [
    "COLOURS",
    "GENERAL_SKILLS",
    "IMAGE_SIZE",
    "IMAGE_TASKS",
    "MANIFEST_NAME",
    "NUM_FRAMES",
    "PALETTE",
    "TASK_SPECS",
    "VIDEO_SPECS",
    "VIDEO_TASKS",
    "WORDS",
    "Sample",
    "TaskSpec",
    "VideoSample",
    "check_vocabulary",
    "general_corpus",
    "general_eval_suite",
    "make_task",
    "make_video_task",
    "uncovered_words",
    "write_benchmark",
    "write_llava_json",
    "write_video_qa_json",
]
