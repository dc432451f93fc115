# basic CNN
python -m experiments.run --flagfile=chu_basic_cnn.flags --flagfile=chu_quick_size.flags --splits=0,1,2 --batch_size=16 --stage1_epochs=0 --stage2_epochs=2 --workdir=runs/chu_demo_budget/chu_basic_cnn
# U-Net, single task, without two-stage
python -m experiments.run --flagfile=chu_unet_single_one_stage.flags --flagfile=chu_quick_size.flags --splits=0,1,2 --batch_size=16 --stage1_epochs=0 --stage2_epochs=38 --workdir=runs/chu_demo_budget/chu_unet_single_one_stage
# U-Net, single task
python -m experiments.run --flagfile=chu_unet_single.flags --flagfile=chu_quick_size.flags --splits=0,1,2 --batch_size=16 --stage1_epochs=2 --stage2_epochs=36 --workdir=runs/chu_demo_budget/chu_unet_single
# U-Net, multi-task, without two-stage
python -m experiments.run --flagfile=chu_multitask_one_stage.flags --flagfile=chu_quick_size.flags --splits=0,1,2 --batch_size=16 --stage1_epochs=0 --stage2_epochs=38 --workdir=runs/chu_demo_budget/chu_multitask_one_stage
# U-Net, multi-task
python -m experiments.run --flagfile=chu_multitask.flags --flagfile=chu_quick_size.flags --splits=0,1,2 --batch_size=16 --stage1_epochs=2 --stage2_epochs=36 --workdir=runs/chu_demo_budget/chu_multitask
# U-Net, multi-task + early stopping
python -m experiments.run --flagfile=chu.flags --flagfile=chu_quick_size.flags --splits=0,1,2 --batch_size=16 --stage1_epochs=2 --stage2_epochs=36 --workdir=runs/chu_demo_budget/chu
# U-Net, single-task emotion
python -m experiments.run --flagfile=chu_emotion_single.flags --flagfile=chu_quick_size.flags --splits=0,1,2 --batch_size=16 --stage1_epochs=0 --stage2_epochs=38 --workdir=runs/chu_demo_budget/chu_emotion_single
