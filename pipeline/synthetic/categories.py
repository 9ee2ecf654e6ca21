"""The nuScenes-lidarseg category list (index = position) and the indices the synthetic world uses.

The names and their order are those of nuScenes-lidarseg v1.0 (32 classes, index 0..31); the devkit
checks the names against its colour map, so they must match exactly. The descriptions are ours.
"""

from __future__ import annotations

LIDARSEG_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("noise", "Points that are not a surface of the scene."),
    ("animal", "Any animal."),
    ("human.pedestrian.adult", "An adult pedestrian."),
    ("human.pedestrian.child", "A child pedestrian."),
    ("human.pedestrian.construction_worker", "A person working at a construction site."),
    ("human.pedestrian.personal_mobility", "A person on a scooter, skateboard or similar."),
    ("human.pedestrian.police_officer", "A police officer."),
    ("human.pedestrian.stroller", "A stroller."),
    ("human.pedestrian.wheelchair", "A wheelchair."),
    ("movable_object.barrier", "A temporary road barrier."),
    ("movable_object.debris", "Movable debris on the road."),
    ("movable_object.pushable_pullable", "Carts, bins and other objects moved by hand."),
    ("movable_object.trafficcone", "A traffic cone."),
    ("static_object.bicycle_rack", "A rack for parking bicycles."),
    ("vehicle.bicycle", "A bicycle."),
    ("vehicle.bus.bendy", "An articulated bus."),
    ("vehicle.bus.rigid", "A rigid bus."),
    ("vehicle.car", "A passenger car, van or SUV."),
    ("vehicle.construction", "A construction vehicle."),
    ("vehicle.emergency.ambulance", "An ambulance."),
    ("vehicle.emergency.police", "A police vehicle."),
    ("vehicle.motorcycle", "A motorcycle."),
    ("vehicle.trailer", "A trailer."),
    ("vehicle.truck", "A truck."),
    ("flat.driveable_surface", "Surface a car can drive on: roads, parking lanes."),
    ("flat.other", "Other flat horizontal surfaces."),
    ("flat.sidewalk", "Sidewalks and pedestrian walkways."),
    ("flat.terrain", "Grass, soil and other natural ground."),
    ("static.manmade", "Buildings, walls, poles, signs and other man-made structures."),
    ("static.other", "Other static objects."),
    ("static.vegetation", "Trees, bushes and hedges above ground level."),
    ("vehicle.ego", "The ego vehicle."),
)

INDEX: dict[str, int] = {name: i for i, (name, _) in enumerate(LIDARSEG_CATEGORIES)}

# The classes the synthetic world contains (lidarseg indices).
PEDESTRIAN = INDEX["human.pedestrian.adult"]
BARRIER = INDEX["movable_object.barrier"]
TRAFFIC_CONE = INDEX["movable_object.trafficcone"]
CAR = INDEX["vehicle.car"]
TRUCK = INDEX["vehicle.truck"]
DRIVEABLE = INDEX["flat.driveable_surface"]
SIDEWALK = INDEX["flat.sidewalk"]
TERRAIN = INDEX["flat.terrain"]
MANMADE = INDEX["static.manmade"]
VEGETATION = INDEX["static.vegetation"]

WORLD_CLASSES: tuple[int, ...] = (
    PEDESTRIAN,
    BARRIER,
    TRAFFIC_CONE,
    CAR,
    TRUCK,
    DRIVEABLE,
    SIDEWALK,
    TERRAIN,
    MANMADE,
    VEGETATION,
)

# Value in the per-pixel class images where a camera ray hits nothing (sky).
SKY = 255
