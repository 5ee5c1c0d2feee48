"""Deep Q-Learning with a target network updated by set_weights, trained eagerly.

Adapted from keras-io "Deep Q-Learning for Atari Breakout" (https://keras.io/examples/rl/deep_q_network_breakout/):
same create_q_model (Conv2D stack, Dense, linear Q head), model and model_target, epsilon-greedy action choice,
replay history, future rewards from model_target outside the tape, one_hot masks, Huber loss, Adam(clipnorm=1.0)
and model_target.set_weights(model.get_weights()). The target network is never given to the optimizer, by design.
A tiny random-frame environment replaces Atari (no gym, no ROMs).
Expected gradtel outcome: healthy, the optimizer steps, no finding (`gradtel check` exit 0).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

EXPECT = {"check_exit": 0, "run_exit": 0, "optimizers": 1, "stepping": 1}

gamma, epsilon, batch_size, num_actions = 0.99, 0.5, 4, 4
rng = np.random.default_rng(0)


def create_q_model():
    inputs = layers.Input(shape=(12, 12, 2))
    layer1 = layers.Conv2D(4, 4, strides=2, activation="relu")(inputs)
    layer2 = layers.Conv2D(8, 3, strides=1, activation="relu")(layer1)
    layer4 = layers.Flatten()(layer2)
    layer5 = layers.Dense(16, activation="relu")(layer4)
    action = layers.Dense(num_actions, activation="linear")(layer5)
    return keras.Model(inputs=inputs, outputs=action)


model = create_q_model()
model_target = create_q_model()
optimizer = keras.optimizers.Adam(learning_rate=0.00025, clipnorm=1.0)
loss_function = keras.losses.Huber()
action_history, state_history, state_next_history, rewards_history, done_history = [], [], [], [], []
update_after_actions, update_target_network = 2, 6

state = rng.random((12, 12, 2)).astype("float32")
for frame_count in range(1, 13):
    if epsilon > rng.random():
        action = int(rng.integers(num_actions))
    else:
        action_probs = model(keras.ops.expand_dims(keras.ops.convert_to_tensor(state), 0), training=False)
        action = int(keras.ops.argmax(action_probs[0]))
    state_next, reward, done = rng.random((12, 12, 2)).astype("float32"), float(rng.random()), False
    action_history.append(action)
    state_history.append(state)
    state_next_history.append(state_next)
    done_history.append(done)
    rewards_history.append(reward)
    state = state_next

    if frame_count % update_after_actions == 0 and len(done_history) > batch_size:
        indices = rng.choice(range(len(done_history)), size=batch_size)
        state_sample = np.array([state_history[i] for i in indices])
        state_next_sample = np.array([state_next_history[i] for i in indices])
        rewards_sample = [rewards_history[i] for i in indices]
        action_sample = [action_history[i] for i in indices]
        done_sample = keras.ops.convert_to_tensor([float(done_history[i]) for i in indices])
        future_rewards = model_target.predict(state_next_sample, verbose=0)
        updated_q_values = rewards_sample + gamma * keras.ops.amax(future_rewards, axis=1)
        updated_q_values = updated_q_values * (1 - done_sample) - done_sample
        masks = keras.ops.one_hot(action_sample, num_actions)
        with tf.GradientTape() as tape:
            q_values = model(state_sample)
            q_action = keras.ops.sum(keras.ops.multiply(q_values, masks), axis=1)
            loss = loss_function(updated_q_values, q_action)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    if frame_count % update_target_network == 0:
        model_target.set_weights(model.get_weights())
