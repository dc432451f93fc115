# basic CNN
python -m experiments.run --flagfile=chu_basic_cnn.flags --flagfile=chu_quick_size.flags --splits=0 --stage1_epochs=0 --stage2_epochs=4 --workdir=runs/chu_quick/chu_basic_cnn
# U-Net, single task, without two-stage
python -m experiments.run --flagfile=chu_unet_single_one_stage.flags --flagfile=chu_quick_size.flags --splits=0 --stage1_epochs=0 --stage2_epochs=10 --workdir=runs/chu_quick/chu_unet_single_one_stage
# U-Net, single task
python -m experiments.run --flagfile=chu_unet_single.flags --flagfile=chu_quick_size.flags --splits=0 --stage1_epochs=4 --stage2_epochs=6 --workdir=runs/chu_quick/chu_unet_single
# U-Net, multi-task, without two-stage
python -m experiments.run --flagfile=chu_multitask_one_stage.flags --flagfile=chu_quick_size.flags --splits=0 --stage1_epochs=0 --stage2_epochs=10 --workdir=runs/chu_quick/chu_multitask_one_stage
# U-Net, multi-task
python -m experiments.run --flagfile=chu_multitask.flags --flagfile=chu_quick_size.flags --splits=0 --stage1_epochs=4 --stage2_epochs=6 --workdir=runs/chu_quick/chu_multitask
# U-Net, multi-task + early stopping
python -m experiments.run --flagfile=chu.flags --flagfile=chu_quick_size.flags --splits=0 --stage1_epochs=4 --stage2_epochs=6 --workdir=runs/chu_quick/chu
# U-Net, single-task emotion
python -m experiments.run --flagfile=chu_emotion_single.flags --flagfile=chu_quick_size.flags --splits=0 --stage1_epochs=0 --stage2_epochs=10 --workdir=runs/chu_quick/chu_emotion_single
